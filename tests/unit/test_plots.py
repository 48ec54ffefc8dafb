"""The run's figures: a small domain still gets its feature map."""

from __future__ import annotations

import pytest
import torch

from udaflow.plots import embed_2d


@pytest.mark.parametrize("per_domain", [1, 4, 15, 200])
def test_the_feature_map_of_a_small_domain_is_drawn(per_domain):
    """t-SNE's perplexity was 30 whatever the points: 30 or fewer (a user's 3 classes x 10 images) failed
    `udaflow run` at evaluation with sklearn's traceback, after every training step."""
    torch.manual_seed(0)
    points, n_source = embed_2d(torch.randn(per_domain, 8), torch.randn(per_domain, 8) + 1)
    assert points.shape == (2 * per_domain, 2) and n_source == per_domain
    assert torch.isfinite(torch.as_tensor(points)).all()
