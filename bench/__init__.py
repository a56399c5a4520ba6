"""fastprompt's benchmark suite (`pytest bench/`): training throughput and memory against the eager baseline."""
