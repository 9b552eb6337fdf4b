"""The lab: evaluation, benchmarks and trace replay, apart from the service.

``kvtier eval``, ``kvtier bench`` and ``kvtier replay`` run what is here; the daemon never
imports it (``tests/test_layering.py`` keeps it so). It ships in the same distribution so that a
deployment can measure itself with the code it runs.

    eval/     what each codec does to a real model's output (KL, top-1, perplexity, passkey)
    bench/    throughput figures, each against a baseline measured in the same run
    replay/   block-access traces through the policies: offline simulation and live replay
"""
