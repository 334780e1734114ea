"""A trainer rank under torchrun: ``python -m services.trainer`` runs the pope command in
$POPE_TRAINER_ARGV (a JSON list), which ``pope trainer --nproc N`` sets before it becomes
torchrun (service.launch). Run torchrun on it yourself for several nodes:

    POPE_TRAINER_ARGV='["trainer", "--config", "pope.yaml"]' torchrun --nnodes 2 ... -m services.trainer
"""

import json
import os
import sys

from services.cli import main
from services.trainer.service import ARGV_VARIABLE

if ARGV_VARIABLE not in os.environ:
    sys.exit(f"python -m services.trainer runs under torchrun with ${ARGV_VARIABLE} set (see its docstring)")
sys.exit(main(json.loads(os.environ[ARGV_VARIABLE])))
