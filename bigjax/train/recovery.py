"""What ``--resume`` may change: the recoveries (a lower learning rate, more epochs) and nothing that
defines the run's data and steps.

A run that diverged at epoch 19, or that should train five epochs more, continues from its last
checkpoint instead of starting over; the change is recorded (``config.json``'s ``resumes`` and a
``resume`` row of the metrics log). Anything else that changes the bags, the steps or the model (tile
size, bag size, batch, accumulation, encoder, aggregator, architecture, seed, ...) would silently
train another run on top of this one's state, and is refused, each setting named.

Settings are compared as flat dicts (``optim.lr``); ``compare`` is shared by the tile-level loop
(``bigjax.train.loop``) and the whole-slide trainer (``bigjax.local.run_state``).
"""

from __future__ import annotations

__all__ = ["LOWER", "MORE", "compare", "refusal"]

LOWER, MORE = "lower", "more"  # the direction a recovery may move its setting


def compare(saved: dict, asked: dict, recoveries: dict[str, str],
            free: tuple[str, ...] = ()) -> tuple[dict, list[str]]:
    """The changes from ``saved`` to ``asked`` a resume may make, and those it may not.

    Args:
      saved: the run's settings (flat: name -> value).
      asked: the resumed run's settings.
      recoveries: name -> LOWER or MORE: a setting that may only move that way.
      free: names that do not change the steps taken (progress bars, logging), allowed either way.
    Returns:
      ({name: [old, new]} allowed, ["name: new (was old)" ...] refused).
    """
    allowed, refused = {}, []
    for name, new in asked.items():
        old = saved.get(name)
        if new == old or name in free:
            if new != old:
                allowed[name] = [old, new]
            continue
        way = recoveries.get(name)
        if way is not None and _numbers(old, new) and (new < old if way == LOWER else new > old):
            allowed[name] = [old, new]
        elif way is not None:
            refused.append(f"{name}: {new!r} (was {old!r}; a resume may only {'lower' if way == LOWER else 'raise'}"
                           " it)")
        else:
            refused.append(f"{name}: {new!r} (was {old!r})")
    return allowed, refused


def refusal(workdir, refused: list[str], recoveries: dict[str, str]) -> str:
    """The one-line message refusing a resume: each setting, and what a resume may change."""
    may = ", ".join(f"a {'lower' if way == LOWER else 'larger'} {name}" for name, way in recoveries.items())
    return (f"--resume of {workdir} with other settings ({'; '.join(refused)}): these define the run's data "
            f"and steps; a resume may change only {may}; resume with the run's own settings, or start "
            f"another --workdir")


def _numbers(*values) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
