"""`featmap demo` as a Ray job: the whole study on one config, with each stage's wall time.

    ray job submit --working-dir . -- python jobs/demo.py --config conf/demo.yaml storage=/abs/path [key=value ...]

RAY_ADDRESS (or --address) names the cluster's dashboard, e.g. http://127.0.0.1:8265. storage must be
absolute (the job runs in a temporary copy of the working dir), as must dataset.root unless builtin:.
Written from the stage registry by `python jobs/_entry.py`.
"""
from _entry import run  # jobs/ is sys.path[0] when run as a script

run("demo")
