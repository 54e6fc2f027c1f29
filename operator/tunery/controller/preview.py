"""What the operator would create for a valid FineTuneJob manifest: every child, serving as it will be once served."""

from typing import Any

from tunery.api.policy import Policy
from tunery.api.resource import FineTuneJob
from tunery.api.status import ModelRecord
from tunery.controller import naming
from tunery.controller.render import render_training_children, training_target
from tunery.controller.serving import render_serving_children, serving_target
from tunery.controller.settings import OperatorSettings

# The API server assigns the real UID on create; the preview shows where it goes.
PREVIEW_UID = "00000000-0000-0000-0000-000000000000"


def preview(finetunejob: FineTuneJob, settings: OperatorSettings, policy: Policy) -> list[dict[str, Any]]:
    """The children of a FineTuneJob that parse_for_cluster accepted, in the order the operator applies them."""
    metadata = finetunejob.metadata.model_copy(
        update={"namespace": finetunejob.metadata.namespace or "default", "uid": PREVIEW_UID}
    )
    finetunejob = finetunejob.model_copy(update={"metadata": metadata})
    spec = finetunejob.spec
    target = training_target(
        finetunejob,
        naming.revision(spec),
        spec.image or settings.trainer_image,
        settings.trainer_termination_grace_seconds,
    )
    children = render_training_children(target)
    if spec.serving.enabled:
        model = ModelRecord(uri=target.output_prefix, name=spec.output.name or target.name)
        children += render_serving_children(serving_target(finetunejob, model, target.revision, settings, policy))
    return children
