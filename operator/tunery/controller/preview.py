"""What the operator would create for a valid FineTuneJob manifest: every child, serving as it will be once served."""

from typing import Any

from tunery.api.policy import Policy
from tunery.api.spec import FineTuneJobSpec
from tunery.controller import naming
from tunery.controller.render import render_training_children, training_target
from tunery.controller.serving import render_serving_children, serving_target
from tunery.controller.settings import OperatorSettings

# The API server assigns the real UID on create; the preview shows where it goes.
PREVIEW_UID = "00000000-0000-0000-0000-000000000000"


def preview(manifest: dict[str, Any], settings: OperatorSettings, policy: Policy) -> list[dict[str, Any]]:
    """The children of a manifest that validate_for_cluster accepts, in the order the operator applies them."""
    metadata = manifest["metadata"]
    identity = {"name": metadata["name"], "namespace": metadata.get("namespace") or "default", "uid": PREVIEW_UID}
    spec = FineTuneJobSpec.model_validate(manifest["spec"])
    target = training_target(
        {**metadata, **identity}, spec, naming.revision(spec), spec.image or settings.trainer_image
    )
    children = render_training_children(target)
    if spec.serving.enabled:
        model = {"uri": target.output_prefix, "name": spec.output.name or target.name}
        serving = serving_target(identity, spec, model, target.revision, settings, policy)
        children += render_serving_children(serving)
    return children
