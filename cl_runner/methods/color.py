"""CoLoR (Wistuba et al. 2023, arXiv:2311.17601): a LoRA adapter per task, and the task identified at
test time from prototypes, so no task id is needed.

Before task t, the frozen base model (adapters off) embeds each training prompt: the mean of
its last hidden states over the prompt's tokens, L2-normalised; k-means (``clusters_per_task``,
5 as in S-Prompts / Renate) turns them into the task's prototypes. At test time each example's
prompt is embedded the same way and the nearest prototype (Euclidean, over the prototypes of
the tasks learnt so far) picks the adapter that answers it. The share of each learnt task's
test examples routed to its own adapter is reported per row (``method_reports`` in
results.json: ``task_identification``).

Optional contrastive term (the design document's CoLoR, not the paper's; off by default):
with ``contrastive_weight`` > 0, each answer token's last hidden state h (normalised) is
pulled towards the current task's representation and pushed from the earlier tasks' (each the
normalised mean of that task's prototypes): ``-log softmax([h.c_t, h.c_0, .., h.c_{t-1}] / T)[0]``,
averaged over the micro-batch's answer tokens, times the weight. It shapes only the current
adapter's features (earlier adapters are frozen), and it counts replayed examples of a
micro-batch as the current task's.
"""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch

from cl_runner.errors import UserError
from cl_runner.methods.base import ContinualMethod
from cl_runner.methods.peft_adapter import PeftAdapter

PROTOTYPES_FILE = "color_prototypes.safetensors"


def kmeans(points: torch.Tensor, k: int, seed: int, iterations: int = 100) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding: ``k`` centroids (fewer if there are fewer points)."""
    generator = torch.Generator().manual_seed(seed)
    k = min(k, len(points))
    centroids = points[torch.randint(len(points), (1,), generator=generator)]
    while len(centroids) < k:  # k-means++: the next seed far from the chosen ones
        distance = torch.cdist(points, centroids).min(dim=1).values.square()
        choice = torch.multinomial(distance / distance.sum(), 1, generator=generator) if distance.sum() > 0 else torch.randint(len(points), (1,), generator=generator)
        centroids = torch.cat([centroids, points[choice]])
    for _ in range(iterations):
        assignment = torch.cdist(points, centroids).argmin(dim=1)
        updated = torch.stack([points[assignment == j].mean(0) if (assignment == j).any() else centroids[j] for j in range(k)])
        if torch.equal(updated, centroids):
            break
        centroids = updated
    return centroids


@torch.no_grad()
def prompt_features(model, batches) -> torch.Tensor:
    """L2-normalised mean of the last hidden states over each prompt's tokens, with the adapters off."""
    features = []
    was_training = model.training
    model.eval()
    try:
        with model.disable_adapter():
            for batch in batches:
                hidden = model(**batch, output_hidden_states=True).hidden_states[-1].float()
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
                features.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(features)


class CoLoR(ContinualMethod):
    def __init__(self, peft: dict, clusters_per_task: int = 5, contrastive_weight: float = 0.0, contrastive_temperature: float = 0.1):
        if not isinstance(clusters_per_task, int) or clusters_per_task < 1:
            raise UserError(f"method.clusters_per_task must be a positive integer, got {clusters_per_task!r}")
        if not isinstance(contrastive_weight, (int, float)) or contrastive_weight < 0:
            raise UserError(f"method.contrastive_weight must be a number >= 0, got {contrastive_weight!r}")
        if not isinstance(contrastive_temperature, (int, float)) or contrastive_temperature <= 0:
            raise UserError(f"method.contrastive_temperature must be a positive number, got {contrastive_temperature!r}")
        self.contrastive_weight = float(contrastive_weight)
        self.contrastive_temperature = float(contrastive_temperature)
        self.current_task = 0
        self.adapters = PeftAdapter(peft, mode="per_task")
        self.clusters_per_task = clusters_per_task
        self.prototypes = torch.empty(0)
        self.prototype_tasks = torch.empty(0, dtype=torch.long)
        self.identification: dict[str, float] = {}

    def setup(self, model):
        return self.adapters.setup(model)

    def before_task(self, model, task_index: int, task) -> None:
        self.adapters.before_task(model, task_index, task)
        self.current_task = task_index
        centroids = kmeans(prompt_features(model, task.input_batches(prompts_only=True)), self.clusters_per_task, seed=task_index)
        self.prototypes = centroids if not len(self.prototypes) else torch.cat([self.prototypes, centroids])
        self.prototype_tasks = torch.cat([self.prototype_tasks, torch.full((len(centroids),), task_index)])

    def trainable_parameters(self, model):
        return self.adapters.trainable_parameters(model)

    def task_representations(self) -> torch.Tensor:
        """One unit vector per task seen so far: the normalised mean of its prototypes."""
        count = int(self.prototype_tasks.max()) + 1 if len(self.prototype_tasks) else 0
        means = torch.stack([self.prototypes[self.prototype_tasks == t].mean(0) for t in range(count)])
        return torch.nn.functional.normalize(means, dim=-1)

    def extra_loss(self, model, batch, outputs):
        if not self.contrastive_weight or self.current_task == 0 or outputs.last_hidden_state is None:
            return None
        hidden = outputs.last_hidden_state[batch["read_rows"], batch["read_cols"]].float()
        anchors = torch.nn.functional.normalize(hidden, dim=-1)
        tasks = self.task_representations().to(anchors.device)
        order = [self.current_task, *range(self.current_task)]  # the current task first: the positive
        logits = anchors @ tasks[order].T / self.contrastive_temperature
        return self.contrastive_weight * -torch.log_softmax(logits, dim=-1)[:, 0].mean()

    def eval_members(self, model, tasks_learnt: int, task_index: int):
        if tasks_learnt == 0:
            return [model.disable_adapter]
        return self.adapters.adapter_members(model, tasks_learnt)

    def route_examples(self, model, tasks_learnt: int, task_index: int | None, prompt_batches):
        if tasks_learnt == 0:
            return None
        known = self.prototype_tasks < tasks_learnt
        features = prompt_features(model, prompt_batches())
        nearest = torch.cdist(features, self.prototypes[known]).argmin(dim=1)
        routes = self.prototype_tasks[known][nearest]
        if task_index is not None and task_index < tasks_learnt:
            self.identification[str(task_index)] = float((routes == task_index).float().mean())
        return routes.tolist()

    def row_report(self, tasks_learnt: int) -> dict | None:
        report, self.identification = {"task_identification": self.identification}, {}
        return report if tasks_learnt else None

    def save_checkpoint(self, model, directory: Path, task_index: int) -> None:
        self.adapters.save_checkpoint(model, directory, task_index)
        safetensors.torch.save_file({"prototypes": self.prototypes.contiguous(), "tasks": self.prototype_tasks.contiguous()}, str(directory / PROTOTYPES_FILE))

    def load_checkpoint(self, model, directories: list[Path]) -> None:
        self.adapters.load_checkpoint(model, directories)
        saved = safetensors.torch.load_file(str(directories[-1] / PROTOTYPES_FILE))
        self.prototypes, self.prototype_tasks = saved["prototypes"], saved["tasks"]
