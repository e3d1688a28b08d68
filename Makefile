# make test   set up .venv (torch 2.13.0 CPU first, then requirements) and run the tests
# make demo   set up, preprocess the sample corpus, train the tiny model, open the chat
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
RUN    ?= model/demo

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

clean:
	rm -rf data/sample/train model/demo
