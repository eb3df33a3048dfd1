# The README's commands. `make test` builds .venv from the repo's files alone (CI runs it).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE ?= 1
export MUJOCO_GL ?= egl

.PHONY: install test test-fast lint format bench demo icg mwh compare gen

# The Meta-World demo (BENCHMARKS.md MW5): five tasks, 20 scripted demonstrations each for
# training, 10 more each held out as prompts; a 128x4 policy trained on the CPU; 20 prompted
# and 20 unprompted evaluation episodes per task.
MW5_TASKS := reach-v3 push-v3 pick-place-v3 drawer-open-v3 button-press-topdown-v3
DEMO_RUN := runs/mw5

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e '.[sim,dev,convert]'
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

# In-context vs classic behaviour cloning on the same data (README "Against behaviour
# cloning"): the ACT-style and diffusion-policy-style presets trained with the demo's recipe on
# its store and split, every policy evaluated on the same episodes, then one table. Needs
# `make demo`'s data and run. Other benchmarks: set COMPARE_DATA, COMPARE_ICL, COMPARE_NAME and
# the flag variables.
COMPARE_NAME ?= mw5
COMPARE_DATA ?= data/mw5.json
COMPARE_PROMPTS ?= data/mw5_prompts.json
COMPARE_ICL ?= $(DEMO_RUN)
COMPARE_TRAIN ?= --shared-cfg.seq-length 192 --shared-cfg.batch-size 8 --trainer-cfg.accum-iter 1 \
	--trainer-cfg.epochs 40 --trainer-cfg.num-workers 0 --optimizer-cfg.lr 1e-3 \
	--optimizer-cfg.warmup-epochs 2 --dataset-cfg.non-overlapping 16 --shared-cfg.save-every 10
COMPARE_EVAL ?= --episodes-per-task 20 --max-steps 200 --workers 2

compare: $(STAMP)
	test -d $(COMPARE_ICL) || { echo "run make demo first (no $(COMPARE_ICL))"; exit 1; }
	for m in act diffusion; do \
	    run=runs/$(COMPARE_NAME)_$$m; \
	    if [ -d $$run ]; then mv $$run $$run.$$(date +%Y%m%d-%H%M%S); fi; \
	    $(PY) scripts/train.py --preset $$m-mini --dataset-cfg.dataset-json $(COMPARE_DATA) \
	        $(COMPARE_TRAIN) --logging-cfg.output-dir runs \
	        --logging-cfg.log-name $(COMPARE_NAME)_$$m --logging-cfg.no-wandb || exit 1; \
	done
	$(PY) scripts/eval.py --checkpoint $(COMPARE_ICL) $(COMPARE_EVAL) --no-prompt \
	    --out $(COMPARE_ICL)/compare_noprompt.json
	$(PY) scripts/eval.py --checkpoint $(COMPARE_ICL) $(COMPARE_EVAL) --num-prompts 1 \
	    --prompt-dataset $(COMPARE_PROMPTS) --out $(COMPARE_ICL)/compare_prompted.json
	$(PY) scripts/eval.py --checkpoint runs/$(COMPARE_NAME)_act $(COMPARE_EVAL) --no-prompt \
	    --out runs/$(COMPARE_NAME)_act/compare.json
	$(PY) scripts/eval.py --checkpoint runs/$(COMPARE_NAME)_diffusion $(COMPARE_EVAL) \
	    --no-prompt --execution open_loop --open-loop-steps 8 \
	    --out runs/$(COMPARE_NAME)_diffusion/compare.json
	$(PY) scripts/compare.py --title $(COMPARE_NAME) \
	    "in-context, 1 prompt=$(COMPARE_ICL)/compare_prompted.json" \
	    "in-context, no prompt=$(COMPARE_ICL)/compare_noprompt.json" \
	    "ACT-style=runs/$(COMPARE_NAME)_act/compare.json" \
	    "diffusion-style=runs/$(COMPARE_NAME)_diffusion/compare.json" \
	    --out runs/$(COMPARE_NAME)_compare.md

bench: $(STAMP)
	$(PY) scripts/benchmark.py all

# ICG (BENCHMARKS.md): in-context generalisation on the robosuite (object, bin) family. The four
# held-out pairs (one per object and per bin) never enter a training store; their demonstrations
# live in a separate store used only for prompts. Evaluated prompted, without a prompt, and with a
# mismatched prompt (another held-out pair: prompt following).
ICG_HELDOUT := PickPlaceMilkToBin1 PickPlaceBreadToBin2 PickPlaceCerealToBin3 PickPlaceCanToBin4
ICG_TRAIN := PickPlaceMilkToBin2 PickPlaceMilkToBin3 PickPlaceMilkToBin4 \
	PickPlaceBreadToBin1 PickPlaceBreadToBin3 PickPlaceBreadToBin4 \
	PickPlaceCerealToBin1 PickPlaceCerealToBin2 PickPlaceCerealToBin4 \
	PickPlaceCanToBin1 PickPlaceCanToBin2 PickPlaceCanToBin3
ICG_MISMATCH := PickPlaceBreadToBin2 PickPlaceCerealToBin3 PickPlaceCanToBin4 PickPlaceMilkToBin1
ICG_RUN := runs/icg
ICG_EVAL := --checkpoint $(ICG_RUN) --env robosuite --tasks $(ICG_HELDOUT) --episodes-per-task 10 \
	--workers 2

icg: $(STAMP)
	$(PY) scripts/collect.py --env robosuite --tasks $(ICG_TRAIN) --episodes-per-task 60 \
	    --prompt-episodes-per-task 5 --workers 2 --seed 0 --out data/icg.zarr --overwrite
	$(PY) scripts/collect.py --env robosuite --tasks $(ICG_HELDOUT) --episodes-per-task 10 \
	    --train-split 1.0 --workers 2 --seed 0 --out data/icg_heldout.zarr --overwrite
	if [ -d $(ICG_RUN) ]; then mv $(ICG_RUN) $(ICG_RUN).$$(date +%Y%m%d-%H%M%S); fi
	$(PY) scripts/train.py --dataset-cfg.dataset-json data/icg.json \
	    --model-cfg.policy-cfg.scratch-llama-config config/model_config/mini.json \
	    --shared-cfg.seq-length 384 --shared-cfg.num-pred-steps 4 --shared-cfg.batch-size 8 \
	    --trainer-cfg.accum-iter 1 --trainer-cfg.max-steps 3000 --trainer-cfg.epochs 100 \
	    --trainer-cfg.num-workers 0 --optimizer-cfg.lr 1e-3 --optimizer-cfg.warmup-epochs 1 \
	    --dataset-cfg.non-overlapping 64 --shared-cfg.save-every-steps 500 \
	    --model-cfg.policy-cfg.no-prompt-loss --model-cfg.policy-cfg.step-weight 5 \
	    --dataset-cfg.num-weighted-steps 50 --dataset-cfg.input-sensors proprio object \
	    --model-cfg.policy-cfg.object-slots 4 --model-cfg.policy-cfg.pointer-loss-weight 1 \
	    --dataset-cfg.moved-object-slots 4 --dataset-cfg.object-pos-dims 7 8 9 \
	    --model-cfg.policy-cfg.goal-loss-weight 1 --dataset-cfg.goal-dims 0 1 2 \
	    --logging-cfg.output-dir runs --logging-cfg.log-name icg --logging-cfg.no-wandb
	$(PY) scripts/probe_prompt.py --checkpoint $(ICG_RUN) --dataset data/icg_heldout.json \
	    --out $(ICG_RUN)/probe_heldout.json
	$(PY) scripts/probe_prompt.py --checkpoint $(ICG_RUN) --dataset data/icg_prompts.json \
	    --out $(ICG_RUN)/probe_train_pairs.json
	$(PY) scripts/eval.py $(ICG_EVAL) --no-prompt --out $(ICG_RUN)/heldout_noprompt.json
	$(PY) scripts/eval.py $(ICG_EVAL) --prompt-dataset data/icg_heldout.json --num-prompts 1 \
	    --out $(ICG_RUN)/heldout_1prompt.json --baseline $(ICG_RUN)/heldout_noprompt.json
	$(PY) scripts/eval.py $(ICG_EVAL) --prompt-dataset data/icg_heldout.json --num-prompts 1 \
	    --prompt-tasks $(ICG_MISMATCH) --out $(ICG_RUN)/heldout_mismatched.json
	for k in 2 3; do $(PY) scripts/eval.py $(ICG_EVAL) --prompt-dataset data/icg_heldout.json \
	    --num-prompts $$k --out $(ICG_RUN)/heldout_$${k}prompt.json || exit 1; done
	$(PY) scripts/eval.py --checkpoint $(ICG_RUN) --env robosuite --episodes-per-task 2 \
	    --workers 2 --prompt-dataset data/icg_prompts.json --num-prompts 1 \
	    --out $(ICG_RUN)/train_pairs_1prompt.json
	$(PY) scripts/eval.py --checkpoint $(ICG_RUN) --env robosuite --episodes-per-task 2 \
	    --workers 2 --no-prompt --out $(ICG_RUN)/train_pairs_noprompt.json

# MWH: Meta-World held-out tasks. Trained on 35 Meta-World v3 tasks; five others, chosen by us
# before any run and never in a training store, are evaluated prompted by their own
# demonstrations (a separate store) and without a prompt. Meta-World's published ML10 and ML45
# *test* tasks are in neither list: they stay an independent check.
MWH_HELDOUT := window-close-v3 button-press-v3 reach-wall-v3 push-wall-v3 pick-place-wall-v3
MWH_TRAIN := assembly-v3 basketball-v3 button-press-topdown-v3 button-press-topdown-wall-v3 \
	button-press-wall-v3 coffee-button-v3 coffee-pull-v3 coffee-push-v3 dial-turn-v3 \
	disassemble-v3 door-open-v3 drawer-close-v3 faucet-open-v3 faucet-close-v3 hammer-v3 \
	handle-press-side-v3 handle-press-v3 handle-pull-side-v3 handle-pull-v3 pick-out-of-hole-v3 \
	pick-place-v3 plate-slide-v3 plate-slide-side-v3 plate-slide-back-v3 plate-slide-back-side-v3 \
	peg-insert-side-v3 peg-unplug-side-v3 soccer-v3 stick-push-v3 stick-pull-v3 push-v3 \
	push-back-v3 reach-v3 sweep-v3 window-open-v3
MWH_RUN := runs/mwh
MWH_FLAGS ?=
MWH_EPOCHS ?= 20
MWH_EVAL := --checkpoint $(MWH_RUN) --env metaworld --max-steps 200 --workers 2

mwh: $(STAMP)
	$(PY) scripts/collect.py --env metaworld --tasks $(MWH_TRAIN) --episodes-per-task 30 \
	    --prompt-episodes-per-task 10 --workers 2 --seed 0 --out data/mwh.zarr --overwrite
	$(PY) scripts/collect.py --env metaworld --tasks $(MWH_HELDOUT) --episodes-per-task 10 \
	    --train-split 1.0 --workers 2 --seed 0 --out data/mwh_heldout.zarr --overwrite
	if [ -d $(MWH_RUN) ]; then mv $(MWH_RUN) $(MWH_RUN).$$(date +%Y%m%d-%H%M%S); fi
	$(PY) scripts/train.py --dataset-cfg.dataset-json data/mwh.json \
	    --model-cfg.policy-cfg.scratch-llama-config config/model_config/mini.json \
	    --shared-cfg.seq-length 192 --shared-cfg.num-pred-steps 4 --shared-cfg.batch-size 8 \
	    --trainer-cfg.accum-iter 1 --trainer-cfg.epochs $(MWH_EPOCHS) --trainer-cfg.num-workers 0 \
	    --optimizer-cfg.lr 1e-3 --optimizer-cfg.warmup-epochs 1 \
	    --dataset-cfg.non-overlapping 32 --shared-cfg.save-every 5 $(MWH_FLAGS) \
	    --logging-cfg.output-dir runs --logging-cfg.log-name mwh --logging-cfg.no-wandb
	$(PY) scripts/eval.py $(MWH_EVAL) --tasks $(MWH_HELDOUT) --episodes-per-task 20 --no-prompt \
	    --out $(MWH_RUN)/heldout_noprompt.json
	$(PY) scripts/eval.py $(MWH_EVAL) --tasks $(MWH_HELDOUT) --episodes-per-task 20 \
	    --prompt-dataset data/mwh_heldout.json --num-prompts 1 \
	    --out $(MWH_RUN)/heldout_1prompt.json --baseline $(MWH_RUN)/heldout_noprompt.json
	$(PY) scripts/eval.py $(MWH_EVAL) --episodes-per-task 10 --no-prompt \
	    --out $(MWH_RUN)/train_tasks_noprompt.json
	$(PY) scripts/eval.py $(MWH_EVAL) --episodes-per-task 10 --prompt-dataset data/mwh_prompts.json \
	    --num-prompts 1 --out $(MWH_RUN)/train_tasks_1prompt.json \
	    --baseline $(MWH_RUN)/train_tasks_noprompt.json

# GEN (BENCHMARKS.md): the goal-mask generator on generated NAMO scenes. 10,000 training scenes;
# two held-out sets of other seeds (200 and 1,000 scenes); a flow-matching and a diffusion
# (v-prediction, DDIM) DiT trained side by side, one thread each (82 min each on 2 cores);
# one sample per held-out scene, scored by the scene checker.
GEN_RUN := runs/gen
GEN_TRAIN := --data.data-dir data/namo10k --max-epochs 40 --batch-size 32 --base-lr 3e-4 \
	--image-size 28 --model.network.patch-size 4 --model.network.hidden-size 192 \
	--model.network.depth 6 --model.network.num-heads 4 --output-dir $(GEN_RUN)

gen: $(STAMP)
	$(PY) scripts/make_namo_masks.py --out data/namo10k --num-scenes 10000 --seed 2 --overwrite
	$(PY) scripts/make_namo_masks.py --out data/namo_test --num-scenes 200 --seed 1 --overwrite
	$(PY) scripts/make_namo_masks.py --out data/namo_test3 --num-scenes 1000 --seed 3 --overwrite
	if [ -d $(GEN_RUN) ]; then mv $(GEN_RUN) $(GEN_RUN).$$(date +%Y%m%d-%H%M%S); fi
	OMP_NUM_THREADS=1 $(PY) scripts/train_generative.py $(GEN_TRAIN) --run-name flow & pid=$$!; \
	trap 'kill $$pid 2>/dev/null' EXIT; OMP_NUM_THREADS=1 $(PY) scripts/train_generative.py $(GEN_TRAIN) --run-name ddim \
	    --model.objective diffusion --model.path.prediction-type v_prediction && wait $$pid
	for m in flow ddim; do for d in namo_test namo_test3; do \
	    $(PY) scripts/sample_goals.py --checkpoint $(GEN_RUN)/$$m --data-dir data/$$d \
	        --out $(GEN_RUN)/samples_$${m}_$$d || exit 1; done; done
