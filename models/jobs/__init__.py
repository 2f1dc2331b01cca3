"""The job contract shared by the job child (training/run.py and the entries it runs) and the
service's job runner: event names and fields, exit codes, job states (events.py), and each kind's
config: fine-tune (train_config.py, checked against backbone_catalog.py), advise and quantize."""
