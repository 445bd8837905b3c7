"""Model-level audit: search the model itself for a trigger, from clean images and the vocabulary.

`search` (per-class trigger search by gradient), `decide` (the outlier test and its calibrated
threshold), `audit` (shortlist, search, decision, confirmation). The scan's stage 5,
`auditor.scan.model_level`, runs it and puts the result in the report.
"""
