.PHONY: up test
up:    ## run the whole stack locally (SQLite, local redis-server, API, worker, Flower)
	bash scripts/up.sh
test:  ## the whole test suite, as CI runs it
	bash scripts/test.sh
