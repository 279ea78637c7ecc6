"""Models in and out of picochat: `picochat export` (a transformers directory) and `picochat import`
(from one, or from a nanochat checkpoint dir).

    layout.py     picochat's weights and config <-> transformers' NanoChat or picochat remote-code ones
    hf.py         the transformers directory: config, weights, tokenizer, chat template; write and read
    nanochat.py   a nanochat checkpoint dir, read without running any of its pickled code
    commands.py   ExportConfig/export and ImportConfig/import_model, the CLI's two commands
    remote/       the modeling files shipped for trust_remote_code=True
"""
