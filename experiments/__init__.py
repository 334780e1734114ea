"""The POPE-vs-GRPO experiment, outside the runtime: the link-chains task family
(``chains``, ``splits``), the base model's pretraining (``pretrain``), the experiment
harness (``spec``, ``experiment``, ``jobs``), the demo (``demo``), the HTML report
(``report``) and their ``pope`` commands (``cli``). Needs the ``experiments`` extra
(matplotlib) for the report; the services never import it."""
