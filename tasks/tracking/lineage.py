"""Where a model came from: walk the registry's ``parent.*`` tags back to the data.

``register_checkpoint`` tags every version with its parents (``parent.pretrained ->
palm-pretrained/3``) and the digests of the data it saw (``data.corpus -> sha256:...``).
``lineage`` follows those tags; ``format_lineage`` prints the tree that
``palm-rlhf lineage models:/palm-policy@candidate`` shows, with the fingerprint of the
code that made each model (``palm_rlhf.code``).
"""

from __future__ import annotations

import re

from tasks.tracking.registry import resolve_model_uri

CODE_TAG = "palm_rlhf.code"  # the code fingerprint of the stage that made a version (tasks/runtime/fingerprint.py)
_VERSION_REF = re.compile(r"^[^/:@]+/\d+$")  # "palm-pretrained/3", as register_checkpoint writes


def _as_model_uri(ref: str) -> str:
    """A parent tag value as something ``resolve_model_uri`` takes."""
    return f"models:/{ref}" if _VERSION_REF.match(ref) else ref


def _key(node: dict) -> str:
    return f"{node['name']}/{node['version']}" if node["name"] else node["checkpoint_uri"]


def _node(uri: str) -> dict:
    info = resolve_model_uri(uri)
    tags = info["tags"]
    return {
        "name": info["name"],
        "version": info["version"],
        "aliases": info.get("aliases", []),
        "run_id": info["run_id"],
        "checkpoint_uri": info["checkpoint_uri"],
        "digest": info["digest"],
        "code": tags.get(CODE_TAG),
        "data": {k[len("data."):]: v for k, v in sorted(tags.items()) if k.startswith("data.")},
        "parents": {k[len("parent."):]: v for k, v in sorted(tags.items()) if k.startswith("parent.")},
    }


def lineage(uri: str) -> list[dict]:
    """Every model behind ``uri``, the model itself first, each listed once.

    A node: name, version, aliases, run_id, checkpoint_uri, digest, code, data (name -> digest)
    and parents (role -> "name/version"). A parent that was never registered (a stage
    fed a raw checkpoint URI) is a node with name None, keyed by its checkpoint URI.
    """
    root = _node(uri)
    nodes, pending = {_key(root): root}, [root]
    while pending:
        node = pending.pop(0)
        for role, ref in node["parents"].items():
            parent = _node(_as_model_uri(ref))
            node["parents"][role] = _key(parent)  # an alias in a tag becomes the version it meant
            if _key(parent) not in nodes:
                nodes[_key(parent)] = parent
                pending.append(parent)
    return list(nodes.values())


def _headline(node: dict) -> str:
    if node["name"] is None:
        return f"checkpoint {node['checkpoint_uri']} (not registered)"
    run = f"run {node['run_id'][:8]}…" if node["run_id"] else "no run"
    aliases = f", aliases: {', '.join(node['aliases'])}" if node["aliases"] else ""
    return f"{node['name']} v{node['version']} ({run}{aliases})"


def format_lineage(nodes: list[dict]) -> str:
    """The lineage as an indented tree, the model first, its parents below it."""
    if not nodes:
        return "(no lineage)"
    by_ref = {_key(n): n for n in nodes}
    lines: list[str] = []

    def draw(node: dict, lead: str, child_lead: str, seen: frozenset) -> None:
        lines.append(lead + _headline(node))
        if node["name"] is not None:
            lines.append(f"{child_lead}  checkpoint {node['checkpoint_uri']}  {node['digest'] or ''}".rstrip())
            lines.append(f"{child_lead}  code {node.get('code') or 'not recorded'}")
        for name, digest in node["data"].items():
            lines.append(f"{child_lead}  data {name} {digest}")
        refs = list(node["parents"].items())
        for i, (role, ref) in enumerate(refs):
            last = i == len(refs) - 1
            branch, below = ("└─ ", "   ") if last else ("├─ ", "│  ")
            parent = by_ref.get(ref)
            if parent is None or _key(parent) in seen:  # unresolved, or a cycle in bad tags
                lines.append(f"{child_lead}  {branch}{role}: {ref}")
                continue
            draw(parent, f"{child_lead}  {branch}{role}: ", f"{child_lead}  {below}", seen | {_key(parent)})

    draw(nodes[0], "", "", frozenset({_key(nodes[0])}))
    return "\n".join(lines)
