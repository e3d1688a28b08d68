# make test   set up .venv (torch 2.13.0 CPU first, then requirements, then chitchat itself)
#             and run the tests
# make test-fast   the tests not marked slow (no subprocesses, servers or browser): < 1 min
# make demo   set up, preprocess the sample corpus, train the tiny model, open the chat
# make train CORPUS=data/train.txt [NAME=mine CONFIG=... ARGS="--max_time 2h"]
#             preprocess your corpus and train on it (continues the run if it exists)
# make chat [RUN=model/mine]   chat with a run (its best/ model when it has one)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
RUN    ?= model/demo
# A few minutes on a laptop CPU; --resume auto makes a second `make demo` continue, not fail.
# 30 of the 339 sample dialogues validate; best/ keeps the epoch with the lowest validation
# loss (the tiny model starts to overfit the sample well before epoch 40).
DEMO_TRAIN_ARGS ?= --epochs 40 --lr 1e-3 --eval_interval 0 --save_interval 200 --log_step 50 \
                   --patience 6
CORPUS ?= data/train.txt
NAME   ?= $(basename $(notdir $(CORPUS)))
CONFIG ?= config/model_config_dialogue_middle.json
ARGS   ?=
# The chat of a run: its best/ model (lowest validation loss) when it has one. A shell test,
# as make expands a recipe before its first line (the training) has run.
CHAT_MODEL = $$([ -f $(RUN)/best/config.json ] && echo $(RUN)/best || echo $(RUN))

.PHONY: setup test test-fast demo train chat clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

# pytest exits 5 when it collects no tests, and make fails on it as on any non-zero status.
test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# The main job on the bundled sample corpus. On a terminal it opens the chat; otherwise (CI,
# scripts) it runs a short scripted conversation and exits.
demo: setup
	$(BIN)/python preprocess.py --train_path data/sample/train.txt --save_path data/sample/train \
	    --val_num 30
	$(BIN)/python train.py --train_path data/sample/train \
	    --model_config config/model_config_dialogue_tiny.json \
	    --run_name demo --resume auto $(DEMO_TRAIN_ARGS)
	@if [ -t 0 ]; then \
	    $(BIN)/python interact.py --model_path $(CHAT_MODEL) --max_history_len 3; \
	else \
	    printf '你好\n你在干嘛\n今天天气怎么样\n/history\n' | \
	        $(BIN)/python interact.py --model_path $(CHAT_MODEL) --max_history_len 3 --seed 1; \
	fi

train: setup
	$(BIN)/python preprocess.py --train_path $(CORPUS) --save_path $(basename $(CORPUS))
	$(BIN)/python train.py --train_path $(basename $(CORPUS)) --model_config $(CONFIG) \
	    --run_name $(NAME) --resume auto $(ARGS)

chat: setup
	$(BIN)/python interact.py --model_path $(CHAT_MODEL) --max_history_len 3

clean:
	rm -rf data/sample/train model/demo
