"""The SGT study's proxy tasks: target builders (``tasks``), OpenCV degradations (``degrade``),
instruction lists (``instructions``). ``docs/proxy_tasks.md`` describes every task."""
