# The README's commands. `make test` builds .venv from the repo's files alone (CI runs it).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE ?= 1
export MUJOCO_GL ?= egl

.PHONY: install test test-fast lint format bench demo

# The Meta-World demo (BENCHMARKS.md MW5): five tasks, 20 scripted demonstrations each for
# training, 10 more each held out as prompts; a 128x4 policy trained on the CPU; 20 prompted
# and 20 unprompted evaluation episodes per task.
MW5_TASKS := reach-v3 push-v3 pick-place-v3 drawer-open-v3 button-press-topdown-v3
DEMO_RUN := runs/mw5

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e '.[sim,dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not sim"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

format: $(STAMP)
	$(VENV)/bin/ruff format .

demo: $(STAMP)
	@start=$$(date +%s); \
	$(PY) scripts/collect.py --env metaworld --tasks $(MW5_TASKS) --episodes-per-task 20 \
	    --prompt-episodes-per-task 10 --workers 2 --seed 0 --out data/mw5.zarr --overwrite && \
	if [ -d $(DEMO_RUN) ]; then mv $(DEMO_RUN) $(DEMO_RUN).$$(date +%Y%m%d-%H%M%S); fi && \
	$(PY) scripts/train.py --dataset-cfg.dataset-json data/mw5.json \
	    --model-cfg.policy-cfg.scratch-llama-config config/model_config/mini.json \
	    --shared-cfg.seq-length 192 --shared-cfg.num-pred-steps 4 --shared-cfg.batch-size 8 \
	    --trainer-cfg.accum-iter 1 --trainer-cfg.epochs 40 --trainer-cfg.num-workers 0 \
	    --optimizer-cfg.lr 1e-3 --optimizer-cfg.warmup-epochs 2 \
	    --dataset-cfg.non-overlapping 16 --shared-cfg.save-every 10 \
	    --logging-cfg.output-dir runs --logging-cfg.log-name mw5 --logging-cfg.no-wandb && \
	$(PY) scripts/eval.py --checkpoint $(DEMO_RUN) --no-prompt --episodes-per-task 20 \
	    --max-steps 200 --workers 2 --out $(DEMO_RUN)/eval_noprompt.json && \
	$(PY) scripts/eval.py --checkpoint $(DEMO_RUN) --prompt-dataset data/mw5_prompts.json \
	    --num-prompts 1 --episodes-per-task 20 --max-steps 200 --workers 2 \
	    --out $(DEMO_RUN)/eval_prompted.json --baseline $(DEMO_RUN)/eval_noprompt.json && \
	echo "make demo: $$(( $$(date +%s) - start )) s in all"

bench: $(STAMP)
	$(PY) scripts/benchmark.py all
