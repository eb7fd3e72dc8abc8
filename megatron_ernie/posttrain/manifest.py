"""The pipeline's manifest: what each stage started from, ran, produced and scored.

`<pipeline.dir>/manifest.json` holds one record per stage: the input
checkpoint, the tokenizer hash of its input and output, the hash of the
resolved stage config, the output checkpoint, the scores and the status. A
stage whose record says "done" with the hashes of the current plan, and whose
output still exists, is skipped; anything else runs. It resumes from its own
last checkpoint (every stage runs with --resume auto) only when its record
shows it interrupted with the same config hash and input; a rerun for another
plan starts over (posttrain/pipeline.py: start_over). The file is
replaced atomically, so a pipeline killed at any moment leaves a readable
manifest and loses at most the stage that was running.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

FORMAT = "megatron_ernie.pipeline_manifest/1"


class Manifest:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.stages: dict[str, dict] = {}
        if self.path.is_file():
            self._read()

    def _read(self) -> None:
        try:
            data = json.loads(self.path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{self.path} is not a pipeline manifest ({err}); move it away to start over") from None
        if data.get("format") != FORMAT:
            raise ValueError(f"{self.path} has format {data.get('format')!r}, expected {FORMAT!r}")
        self.stages = data.get("stages", {})

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        temporary.write_text(json.dumps({"format": FORMAT, "stages": self.stages}, indent=2, sort_keys=True))
        os.replace(temporary, self.path)

    def is_done(self, name: str, config_hash: str, output: Path) -> bool:
        record = self.stages.get(name, {})
        return (record.get("status") == "done" and record.get("config_hash") == config_hash
                and (Path(output) / "meta.json").is_file())

    def update(self, name: str, **fields) -> None:
        self.stages.setdefault(name, {}).update(fields, updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
        self.save()
