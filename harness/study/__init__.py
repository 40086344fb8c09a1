"""The study: its typed config and checks (`config`, `checks`), the pipeline that runs data
check -> extraction -> metrics -> report (`pipeline`), the results file (`results`),
CKNNA against task success (`success`) and the report (`report/`)."""
