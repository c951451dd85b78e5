"""`runtime predict` over files: `inputs` (listing), `runner` (decode, detect and landmark on a pipeline of
threads), `writers` (JSON, JSONL, CSV, pictures). Nothing is imported here."""
