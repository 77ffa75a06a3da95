from newllm_cli.cli.app import entry

entry()
