"""Many prompts of one form are validated as one batch (prompts.check_prompt_batch): the same CheckedPrompts as
checking them one by one, and any batch it cannot take, a bad prompt included, goes one by one, so errors are
the first bad prompt's own."""

from __future__ import annotations

import numpy as np
import pytest

from sam2rt.errors import InvalidPromptError
from sam2rt.runtime import Prompt
from sam2rt.runtime.model import Sam2Model
from sam2rt.runtime.prompts import check_prompt_batch

HW = (480, 640)


def _one_by_one(prompts: list[Prompt]) -> list:
    return [p.checked(HW) for p in prompts]


def _forms(rng: np.random.Generator, b: int) -> dict[str, list[Prompt]]:
    h, w = HW

    def box() -> np.ndarray:
        x0, y0 = rng.uniform(0, w / 2), rng.uniform(0, h / 2)
        return np.array([x0, y0, x0 + rng.uniform(0, w / 2), y0 + rng.uniform(0, h / 2)])

    def points(n: int) -> tuple[np.ndarray, np.ndarray]:
        return np.stack([rng.uniform(0, w, n), rng.uniform(0, h, n)], axis=1), rng.integers(0, 2, n)

    return {
        "boxes": [Prompt(box=box()) for _ in range(b)],
        "one click": [Prompt(*points(1)) for _ in range(b)],
        "three points": [Prompt(*points(3)) for _ in range(b)],
        "box and two points": [Prompt(*points(2), box=box()) for _ in range(b)],
        "lists, not arrays": [Prompt(points=[[10, 20]], labels=[1], box=[1, 2, 30, 40]) for _ in range(b)],
        "edges": [Prompt(points=np.array([[0.0, 0.0], [w, h]]), labels=np.array([1, 0])) for _ in range(b)],
    }


@pytest.mark.parametrize("b", [2, 16])
def test_a_batch_of_one_form_equals_checking_one_by_one(b: int):
    rng = np.random.default_rng(b)
    for form, prompts in _forms(rng, b).items():
        batch = check_prompt_batch(prompts, HW)
        assert batch is not None, f"{form}: not taken as a batch"
        assert len(batch) == b
        for got, want in zip(Sam2Model.check_prompts(prompts, HW), _one_by_one(prompts)):
            assert got.coords.dtype == want.coords.dtype == np.float32 and got.mask is None
            np.testing.assert_array_equal(got.coords, want.coords, err_msg=form)
            np.testing.assert_array_equal(got.labels, want.labels, err_msg=form)


def test_mixed_forms_are_checked_one_by_one_with_the_same_results():
    rng = np.random.default_rng(0)
    forms = _forms(rng, 3)
    mask = Prompt(mask_input=np.zeros((256, 256), np.float32), box=np.array([1.0, 2.0, 50.0, 60.0]))
    for prompts in (forms["boxes"] + forms["one click"], forms["one click"] + forms["three points"],
                    forms["boxes"] + [mask]):
        assert check_prompt_batch(prompts, HW) is None
        for got, want in zip(Sam2Model.check_prompts(prompts, HW), _one_by_one(prompts)):
            np.testing.assert_array_equal(got.coords, want.coords)
            np.testing.assert_array_equal(got.labels, want.labels)
            assert (got.mask is None) == (want.mask is None)


BAD = {
    "a point outside the image": Prompt(points=np.array([[700.0, 10.0]]), labels=np.array([1])),
    "a box corner outside the image": Prompt(box=np.array([10.0, 10.0, 20.0, 481.0])),
    "a reversed box": Prompt(box=np.array([50.0, 10.0, 20.0, 40.0])),
    "a NaN": Prompt(points=np.array([[np.nan, 10.0]]), labels=np.array([1])),
    "an unknown label": Prompt(points=np.array([[5.0, 10.0]]), labels=np.array([7])),
    "labels without points": Prompt(labels=np.array([1]), box=np.array([1.0, 2.0, 30.0, 40.0])),
    "points without labels": Prompt(points=np.array([[5.0, 10.0]])),
    "one label for two points": Prompt(points=np.array([[5.0, 10.0], [6.0, 11.0]]), labels=np.array([1])),
    "text for a box": Prompt(box="1,2,3,4"),
}


@pytest.mark.parametrize("bad", list(BAD))
def test_a_bad_prompt_in_a_batch_raises_its_own_error(bad: str):
    """A bad prompt among good ones of the same form: the error decode() raises is that prompt's own, as checking it
    alone says, not one the batch made up."""
    prompt = BAD[bad]
    good = Prompt(points=np.array([[5.0, 10.0]]), labels=np.array([1]), box=np.array([1.0, 2.0, 30.0, 40.0]))
    if prompt.box is None and prompt.labels is not None and prompt.points is not None:
        good = Prompt(points=np.array([[5.0, 10.0]] * len(prompt.points)), labels=np.array([1] * len(prompt.points)))
    with pytest.raises(InvalidPromptError) as alone:
        prompt.checked(HW)
    with pytest.raises(InvalidPromptError) as batched:
        Sam2Model.check_prompts([good] * 3 + [prompt] + [good] * 4, HW)
    assert str(batched.value) == str(alone.value)
