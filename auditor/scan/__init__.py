"""The scan (DESIGN §4) as a package whose modules follow the data.

- stage 0, `screen`: DATA and the audited model -> every image's top-k probabilities (cached);
- stage 1, `screen`: predictions and claimed labels -> the images the oracle checks first;
- stage 2, `check` (Algorithm 1): images, oracle, scorer -> an `ImageCheck` per image (objects,
  disagreement, trigger candidate);
- stage 1 again, `suspects`: checks -> the classes to confirm (clusters of look-alike
  candidates, outlying disagreement); the oracle then checks every image predicted as one;
- stage 3, `confirm` and `trigger` (Algorithm 2): a cluster or a suspect, clean images -> a
  `Finding` (prototype, transplant success);
- stage 3, `victims`: a prototype and the target's images -> victim samples, boxes, oracle labels;
- stage 3, `findings`: the findings -> confirmed targets and the schema-v1 `Report`;
- stage 4, `compact`: findings and checks -> the fine-tuning pairs.

Beside them: `context` (what the stages share), `cache` (resumable scans), `writers` (the files
in `--out`), and `pipeline`, which runs the stages in this order.
"""

from auditor.scan.context import ScanConfig
from auditor.scan.pipeline import COMPACT_DIR, TRIGGER_FILE, ScanResult, scan

__all__ = ["COMPACT_DIR", "TRIGGER_FILE", "ScanConfig", "ScanResult", "scan"]
