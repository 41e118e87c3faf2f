"""`featmap featinv-viz` as a Ray job (see the README's FeatInv-Viz section):

    ray job submit --working-dir . [--entrypoint-num-gpus 1] -- python jobs/featinv_viz.py --config conf/demo.yaml storage=/abs/path [key=value ...]

It samples in the job's driver process: with featinv.sampling.num_gpus > 0, --entrypoint-num-gpus 1
places the driver on a GPU node. storage (and featinv.base_model / featinv.controlnet /
featinv.viz.concepts when they are paths) must be absolute and on storage every node sees.
"""
from _entry import run  # jobs/ is sys.path[0] when run as a script

run("featinv-viz")
