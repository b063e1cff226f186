"""Model profiles: everything model-specific (preprocessing, coordinates, templates, parsers, limits).

Profiles are YAML files in configs/profiles/, validated on load; nothing in the pipeline branches on a
model name.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from densify.config.loading import config_dir, load_yaml_model


class Preprocess(BaseModel):
    model_config = ConfigDict(extra="forbid")
    focal: float | None = Field(None, description="resize so the focal length is this many pixels")
    max_side: int | None = Field(None, description="resize so max(W, H) equals this")
    square_pixels: bool = Field(True, description="resample rows first when fx != fy")
    resample: Literal["bicubic", "bilinear", "lanczos", "nearest", "area", "pil_default"] = Field(
        "bicubic", description="PIL filter of the resize (pil_default: none given, PIL's own default)")
    size_rounding: Literal["round", "truncate"] = Field(
        "round", description="new size round(W * s) or int(W * s)")
    undistort: Literal["none", "opencv_alpha1"] = Field(
        "none", description="opencv_alpha1: when |fx - fy| > undistort_tol, OpenCV's optimal new camera "
                            "matrix (alpha=1, no distortion) and undistort into it")
    undistort_tol: float = Field(1e-3, ge=0)
    pixel_mapping: Literal["scale", "intrinsics"] = Field(
        "scale", description="original -> preprocessed pixel: x * s, or (x - cx) * (fx' / fx) + cx'")
    pixel_rounding: Literal["none", "truncate"] = Field(
        "none", description="the integer pixel a marker is drawn at: rounded, or int() as DepthLM's release")

    @model_validator(mode="after")
    def _one_rule(self):
        if (self.focal is None) == (self.max_side is None):
            raise ValueError("set exactly one of preprocess.focal and preprocess.max_side")
        if self.square_pixels and self.undistort != "none":
            raise ValueError("preprocess.square_pixels and preprocess.undistort are two ways of handling fx != fy; "
                             "set square_pixels: false with an undistort rule")
        return self

    def image_options(self) -> dict:
        """These settings as the keywords of `densify.io.cameras.prepare_image`."""
        return self.model_dump(exclude={"focal", "max_side"}) | {"focal": self.focal, "max_side": self.max_side}


class Marker(BaseModel):
    """Red pixels set on the preprocessed image to point at the queried pixel (DepthLM's arrow).

    `pixels` are (dx, dy) offsets from the queried pixel, each painted `color`; a query closer to a border
    than `margin` cannot be marked (the release skips it; densify records it as `unmarkable`)."""
    model_config = ConfigDict(extra="forbid")
    color: tuple[int, int, int] = (255, 0, 0)
    pixels: list[tuple[int, int]] = Field(min_length=1, description="(dx, dy) offsets painted, in order")
    margin: int = Field(ge=0, description="markable: margin <= x < W - margin and margin <= y < H - margin")

    @model_validator(mode="after")
    def _inside_margin(self):
        reach = max(max(abs(dx), abs(dy)) for dx, dy in self.pixels)
        if reach > self.margin:
            raise ValueError(f"marker.pixels reach {reach} px from the queried pixel but margin is {self.margin}: "
                             f"a marker near a border would be clipped")
        return self


class RegionFormat(BaseModel):
    """How an object profile writes an image region into a question (VLM3-object: a normalised box)."""
    model_config = ConfigDict(extra="forbid")
    format: str = Field(description="exact text of one region; {x1} {y1} {x2} {y2} are normalised box corners")
    coord_range: int = Field(description="box corners are normalised to [0, coord_range] relative to W and H")
    relative_to: Literal["original", "preprocessed"] = Field(
        "original", description="the image whose width and height normalise the box")
    mask_token: str = Field("<mask>", description="placeholder in question text replaced by each region in turn")
    image_token: str = Field("<image>", description="removed from a benchmark's question text (with the "
                                                    "whitespace around the text)")
    answer_region_regex: str = Field(r"Region \[(\d+)\]",
                                     description="region reference in a benchmark's answer text (group 1: index)")
    region_regex: str = Field(description="a region as the model writes it (groups: x1, y1, x2, y2)")


class Question(BaseModel):
    """One kind of question a profile asks, with its exact template and parser."""
    model_config = ConfigDict(extra="forbid")
    template: str = Field(description="exact text; {x} {y} (or {x1} {y1}) are prompt coordinates; object "
                                      "questions have one region mask token per region instead")
    parser: Literal["depth", "xy", "angle", "euler", "vector3", "distance",
                    "predicate", "choice", "metric", "clock"]
    regex: str = Field(description="the release's answer regex (Python syntax); predicate: the affirmative words")
    regex_negative: str | None = Field(None, description="predicate: the negative words (earliest match wins)")
    category: str | None = Field(None, description="object task: the SpatialRGPT-Bench category it asks "
                                                   "(default: the question name)")
    regions: int | None = Field(None, ge=1, le=2, description="object task: regions the template refers to")
    strip_think: bool = Field(False, description="remove <think>...</think> before matching")
    structured_regex: str | None = Field(None, description="optional regex for guided decoding")
    max_tokens: int = 256
    answer_format: str | None = Field(None, description="the model's published answer text, the number as one "
                                      "format field ({d:.2f}) wherever it appears: its fixed text is then forced "
                                      "instead of generated (densify.queries.forcing); null: not published")
    learn_answer_format: bool = Field(False, description="without answer_format: a job may learn the fixed text "
                                      "from its first unforced answers, then force and audit it")

    @model_validator(mode="after")
    def _answer_format(self):
        if self.answer_format is not None:
            from densify.config.answer_format import AnswerFormat

            AnswerFormat.parse(self.answer_format)
        return self


class Profile(BaseModel):
    """A point-query model's trained input format."""
    model_config = ConfigDict(extra="forbid")
    name: str
    model: str = Field(description="checkpoint name or path")
    task: Literal["depth", "corr", "pose", "object"]
    images_per_query: Literal[1, 2] = 1
    preprocess: Preprocess
    coord_range: int | None = Field(None, description="prompt coordinates are in [0, coord_range)")
    marker: Marker | None = None
    regions: RegionFormat | None = Field(None, description="object task: how regions are written")
    system_prompt: str | None = None
    suffix: str = Field("", description="appended to every question (e.g. a thinking request)")
    prefill: str | None = Field(None, description="assistant-answer prefix; off unless set")
    questions: dict[str, Question]
    default_question: str

    @model_validator(mode="after")
    def _check(self):
        if self.default_question not in self.questions:
            raise ValueError(f"default_question {self.default_question!r} is not in questions")
        if self.marker is None and self.coord_range is None and self.task in ("depth", "corr"):
            raise ValueError("a depth or corr profile needs coord_range or a marker")
        if self.task == "object":
            if self.regions is None:
                raise ValueError("an object profile needs 'regions' (how a region is written in a question)")
            for name, q in self.questions.items():
                n = q.template.count(self.regions.mask_token)
                if q.regions is None or n != q.regions:
                    raise ValueError(f"questions.{name}: template has {n} {self.regions.mask_token!r} token(s) "
                                     f"but regions is {q.regions}; they must agree")
                if q.parser not in ("predicate", "choice", "metric", "clock"):
                    raise ValueError(f"questions.{name}: parser {q.parser!r} is not an object parser "
                                     f"(predicate, choice, metric, clock)")
                if q.parser == "predicate" and not q.regex_negative:
                    raise ValueError(f"questions.{name}: a predicate question needs regex_negative")
        return self

    @property
    def question(self) -> Question:
        return self.questions[self.default_question]


def profiles_dir() -> Path:
    return config_dir() / "profiles"


def available_profiles() -> list[str]:
    return sorted(p.stem for p in profiles_dir().glob("*.yaml"))


@functools.lru_cache(maxsize=None)
def _load_named(name: str) -> Profile:
    path = profiles_dir() / f"{name}.yaml"
    if not path.is_file():
        raise KeyError(f"unknown profile {name!r}; available: {', '.join(available_profiles())} "
                       f"(or pass a path to a profile YAML)")
    return load_yaml_model(Profile, path)


def load_profile(name_or_path: str | Path | Profile) -> Profile:
    if isinstance(name_or_path, Profile):
        return name_or_path
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return load_yaml_model(Profile, p)
    return _load_named(str(name_or_path))
