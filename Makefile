# make test   set up .venv (torch 2.13.0 CPU first, then requirements) and run the tests
# make demo   set up, preprocess the sample corpus, train the tiny model, open the chat
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
RUN    ?= model/demo
# A few minutes on a laptop CPU; --resume auto makes a second `make demo` continue, not fail.
DEMO_TRAIN_ARGS ?= --epochs 40 --lr 1e-3 --eval_interval 0 --save_interval 200 --log_step 50

.PHONY: setup test demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.txt -r requirements-dev.txt
	touch $@

test: setup
	$(BIN)/python -m pytest -q

# The main job on the bundled sample corpus. On a terminal it opens the chat; otherwise (CI,
# scripts) it runs a short scripted conversation and exits.
demo: setup
	$(BIN)/python preprocess.py --train_path data/sample/train.txt --save_path data/sample/train
	$(BIN)/python train.py --train_path data/sample/train \
	    --model_config config/model_config_dialogue_tiny.json \
	    --run_name demo --resume auto $(DEMO_TRAIN_ARGS)
	@if [ -t 0 ]; then \
	    $(BIN)/python interact.py --model_path $(RUN) --max_history_len 3; \
	else \
	    printf '你好\n你在干嘛\n今天天气怎么样\n/history\n' | \
	        $(BIN)/python interact.py --model_path $(RUN) --max_history_len 3 --seed 1; \
	fi

clean:
	rm -rf data/sample/train model/demo
