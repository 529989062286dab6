"""Everything that leaves the machine: the model card, the license notice and the Hub upload."""

from hai_medqa.publish.hub import PublishError, UploadPlan, check_repo_id, publish, release_files
from hai_medqa.publish.license import LICENSE_NOTICE, name_rule_problem, write_license
from hai_medqa.publish.model_card import ModelCardError, render_model_card, write_model_card

__all__ = [
    "LICENSE_NOTICE",
    "ModelCardError",
    "PublishError",
    "UploadPlan",
    "check_repo_id",
    "name_rule_problem",
    "publish",
    "release_files",
    "render_model_card",
    "write_license",
    "write_model_card",
]
