"""Expert chains of thought for CalibRL training data, generated and verified: ``python -m calibrl_verl.experts``.

* ``cli``: the ``generate`` command (flags, the run, outputs and summary);
* ``data``: the input parquet, problems (rows grouped by content), the output and failures parquets;
* ``cache``: the append-only attempt cache (resume, torn-line tolerance, what is settled);
* ``session``: verification with the training reward, cache records, counts and the progress bar;
* ``endpoint``: any OpenAI-compatible chat endpoint (async ``openai`` client, our retry policy);
* ``local``: offline ``vllm.LLM`` generation through the generation layer (``calibrl_verl.generation``, shared
  with the ``evaluate`` CLI).
"""
