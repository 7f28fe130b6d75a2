"""The evaluation: workloads, trace files, sweeps, paired statistics and reports.

- `workloads`: the AVMP paper's synthetic presets, `shift`, arrival processes.
- `sharegpt`: ShareGPT request lengths (vLLM `bench serve` rules or the paper's).
- `traces`: trace files: JSONL or a JSON array, Azure LLM inference, BurstGPT, Mooncake,
  and any CSV or TSV whose header names the arrival time, prompt and output tokens.
- `sweep`: allocators x workloads x models x budgets x GPU profiles x seeds, resumable.
- `stats`: AVMP / baseline ratios with paired-bootstrap 95% CIs, aggregates.
- `report`: Markdown and self-contained HTML with figures, from saved cells only.
"""
