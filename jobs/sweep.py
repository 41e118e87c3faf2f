"""`featmap sweep` as a Ray job (see featmap_ray/cli.py and the README's study section):

    ray job submit --working-dir . -- python jobs/sweep.py --config conf/demo.yaml storage=/abs/path [key=value ...]

storage must be absolute and on storage every node sees (the job runs in a temporary copy of the
working dir, and mapping runs write their checkpoints under <storage>/mapping).
"""
from _entry import run  # jobs/ is sys.path[0] when run as a script

run("sweep")
