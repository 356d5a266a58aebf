"""The JSON shapes of the web API (see CONTRACT.md), as pydantic models for validation and /docs."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable reason, e.g. not_an_image, too_large, unauthorized")
    message: str = Field(description="what was wrong and what would be accepted")


class ErrorResponse(BaseModel):
    """Every error answer: ``{"error": {"code", "message"}}``."""

    error: ErrorDetail


class ClassProbability(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    class_: str = Field(alias="class", description="class name")
    probability: float = Field(ge=0.0, le=1.0)


class Prediction(BaseModel):
    filename: str
    top: list[ClassProbability] = Field(description="the top_k classes, most probable first")
    answer: str | None = Field(
        default=None,
        description="the decision, present when the model has stored thresholds or an out-of-distribution score: "
        "the most probable class (that clears its threshold), or 'unknown' (none clears its threshold, or the "
        "image is none of the classes)")
    ood_score: float | None = Field(
        default=None,
        description="present when the model stores an out-of-distribution score: how much the image looks like the "
        "training images (higher: more); below the model's threshold the answer is 'unknown'")
    labels: list[str] | None = Field(
        default=None,
        description="multi-label models only: every label whose probability clears its threshold, most probable "
        "first (empty when none does)")


class PredictResponse(BaseModel):
    model: str = Field(description="the model's name (its run folder)")
    predictions: list[Prediction] = Field(description="one per uploaded file, in upload order")


class ExplainResponse(BaseModel):
    filename: str
    predicted: str = Field(description="the predicted class, the one the map explains")
    probability: float = Field(ge=0.0, le=1.0, description="probability of the predicted class")
    method: str
    width: int = Field(description="map width, the model's input width")
    height: int = Field(description="map height, the model's input height")
    map: list[list[float]] = Field(description="attribution map (height rows of width values), scaled to [0, 1]")


class ModelCard(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    name: str
    arch: str
    classes: list[str]
    input_shape: list[int] = Field(description="[channels, height, width]")
    test_metrics: dict[str, float | int | None] = Field(
        description="accuracy, macro_f1 and what else the run's test evaluation recorded (null when unknown)")
    trained: str | None = Field(description="when the checkpoint was written, ISO 8601")
    temperature: float = Field(description="softmax temperature applied to the probabilities (1 = none)")
    has_thresholds: bool = Field(description="whether predictions carry a thresholded 'answer' (or 'labels')")
    task: str = Field(default="single", description="single (one class per image) or multilabel (a set of labels)")
    runtime: str = Field(description="torch, onnx or onnx-int8")
    parameters: int | None = Field(description="number of model parameters")
    unknown: dict[str, float | str | None] | None = Field(
        default=None, description="the out-of-distribution score behind the answer 'unknown': its name (score), "
                                  "the threshold below which an image is unknown, the share of in-class (val) images "
                                  "it was set to reject (frr_target), its AUROC and what it was measured against; "
                                  "null when the model stores none")


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    ready: bool
    explanations: int | None = None  # explanations running or waiting, while there are any
    explanation_slots: int | None = None
    saturated: bool | None = None  # every slot taken: /v1/explain answers 503 until one ends
