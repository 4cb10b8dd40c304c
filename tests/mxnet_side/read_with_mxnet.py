"""Read RecordIO files with MXNet 1.9.1 itself (run by .mxnet-venv's interpreter, NOT the project's).

Usage: read_with_mxnet.py REQUEST_JSON OUT_JSON
REQUEST_JSON: {"name": {"idx": path, "rec": path, "insightface": bool}, ...}
OUT_JSON:     {"name": {"keys": [keys in .idx order], "records": {key: {offset, flag, label, id, id2,
               image_sha256, image_len, payload_sha256, payload_len}},
               "insightface": {"imgidx": [...], "labels": [...], "shapes": [[h, w, c], ...]}}}
               (the "insightface" part only when requested)

This is how insightface and MXNet's ImageRecordIter see a file: MXIndexedRecordIO seeks to the
offset in the .idx and dmlc's RecordIO reader reassembles continuation parts; mx.recordio.unpack
splits IRHeader, the flag float32 labels and the image bytes. With "insightface": true the data set
is also indexed the way insightface's arcface_torch ``MXFaceDataset`` does it (record 0's first label
bounds the image keys; an image's class is its label or the first of its labels) and every image is
decoded with ``mx.image.imdecode``.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import sys

import mxnet as mx


def read(idx_path: str, rec_path: str) -> dict:
    reader = mx.recordio.MXIndexedRecordIO(idx_path, rec_path, "r")
    records = {}
    for key in reader.keys:
        payload = reader.read_idx(key)
        header, image = mx.recordio.unpack(payload)
        records[str(key)] = {
            "offset": reader.idx[key],
            "flag": int(header.flag),
            "label": [float(v) for v in header.label] if header.flag > 0 else float(header.label),
            "id": int(header.id),
            "id2": int(header.id2),
            "image_sha256": hashlib.sha256(image).hexdigest(),
            "image_len": len(image),
            "payload_sha256": hashlib.sha256(payload).hexdigest(),
            "payload_len": len(payload),
        }
    reader.close()
    return {"keys": [int(k) for k in reader.keys], "records": records}


def insightface_view(idx_path: str, rec_path: str) -> dict:
    """What insightface's MXFaceDataset would train on: image keys, class labels, decoded shapes."""
    reader = mx.recordio.MXIndexedRecordIO(idx_path, rec_path, "r")
    header, _ = mx.recordio.unpack(reader.read_idx(0))
    assert header.flag > 0, "record 0 is not an insightface header record"
    imgidx = list(range(1, int(header.label[0])))
    labels, shapes = [], []
    for key in imgidx:
        head, image = mx.recordio.unpack(reader.read_idx(key))
        label = head.label if isinstance(head.label, numbers.Number) else head.label[0]
        labels.append(float(label))
        shapes.append(list(mx.image.imdecode(image).shape))
    reader.close()
    return {"imgidx": imgidx, "labels": labels, "shapes": shapes}


def main(request_path: str, out_path: str) -> None:
    with open(request_path) as f:
        request = json.load(f)
    out = {}
    for name, paths in request.items():
        out[name] = read(paths["idx"], paths["rec"])
        if paths.get("insightface"):
            out[name]["insightface"] = insightface_view(paths["idx"], paths["rec"])
    with open(out_path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
