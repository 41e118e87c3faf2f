"""`featmap recon-eval` as a Ray job (see the README's FeatInv section):

    ray job submit --working-dir . -- python jobs/recon_eval.py --config conf/demo.yaml storage=/abs/path [key=value ...]

storage (and featinv.base_model / featinv.controlnet when they are paths) must be absolute and on
storage every node sees.
"""
from _entry import run  # jobs/ is sys.path[0] when run as a script

run("recon-eval")
