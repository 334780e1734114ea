"""torchrun, as ``pope trainer --nproc N`` becomes it: ``python -m services.trainer.launch
<torchrun arguments>``.

torchrun itself, stopped by SIGTERM, ends its workers (they have ``--shutdown-timeout`` to
finish: rank 0 writes the resume state) and then exits with status 1 and a traceback. Here
it dies by the signal that stopped it instead, as a single trainer process does (uvicorn
re-raises it), so a supervisor sees one kind of clean stop at any world size.
"""

import os
import signal
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.run import main

try:
    main(sys.argv[1:])
except SignalException as exc:  # its workers are already stopped
    signal.signal(exc.sigval, signal.SIG_DFL)
    os.kill(os.getpid(), exc.sigval)
