"""Studies: the `ctp-bench` runner (`bench`), reading lm-eval results (`runs`), the leaderboard pages
(`leaderboard`) and their plots (`plots`)."""
