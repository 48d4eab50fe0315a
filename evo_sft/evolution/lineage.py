"""The family tree of a population: members, their parents, and every event."""

import json
from dataclasses import asdict, dataclass


@dataclass
class MemberInfo:
    id: int
    parent_id: int | None
    generation_born: int
    mutation: str
    hyperparameters: dict
    slot: int | None = None  # where it lives, from birth to retirement (None in lineages saved before slots were kept)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MemberInfo":
        return cls(**d)


def _json_copy(value):
    """Deep copy through JSON: fails early on values a checkpoint could not store."""
    return json.loads(json.dumps(value))


class Lineage:
    """Members by id plus an append-only, JSON-serialisable event log."""

    def __init__(self):
        self.members: dict[int, MemberInfo] = {}
        self.events: list[dict] = []
        self._next_id = 0

    def found(self, hyperparameters: dict, generation: int = 1, slot: int | None = None) -> int:
        """Add a founder (no parent); return its id."""
        return self._add(None, generation, hyperparameters, "none", "found", slot)

    def clone(self, parent_id: int, generation: int, hyperparameters: dict, mutation: str,
              slot: int | None = None) -> int:
        """Add a child of `parent_id`; return its id."""
        if parent_id not in self.members:
            raise KeyError(f"Lineage.clone: unknown parent id {parent_id}")
        return self._add(parent_id, generation, hyperparameters, mutation, "clone", slot)

    def mutate(self, member_id: int, generation: int, hyperparameters: dict, mutation: str) -> None:
        """Record that a kept member's hyperparameters changed."""
        if member_id not in self.members:
            raise KeyError(f"Lineage.mutate: unknown member id {member_id}")
        member = self.members[member_id]
        member.hyperparameters = _json_copy(hyperparameters)
        self._event("mutate", generation, member_id, member.parent_id, hyperparameters, mutation)

    def record(self, kind: str, generation: int, **fields) -> None:
        """Append any other event (e.g. "restart", "replace", "nonfinite")."""
        self.events.append(_json_copy({"kind": kind, "generation": generation, **fields}))

    def ancestry(self, member_id: int) -> list[int]:
        """[member, parent, grandparent, ...] up to the founder."""
        chain = [member_id]
        parent = self.members[member_id].parent_id
        while parent is not None:
            chain.append(parent)
            parent = self.members[parent].parent_id
        return chain

    def line(self, member_id: int, generations: int) -> list[int]:
        """The member of `member_id`'s line that trained in each generation 1..`generations`: an
        ancestor until the generation its child was born in."""
        chain = self.ancestry(member_id)[::-1]
        line = []
        for generation in range(1, generations + 1):
            while len(chain) > 1 and self.members[chain[1]].generation_born <= generation:
                chain.pop(0)
            line.append(chain[0])
        return line

    def occupant(self, slot: int, generation: int) -> int | None:
        """The member that lived in `slot` during `generation` (the last one born there by then)."""
        born = [(m.generation_born, m.id) for m in self.members.values()
                if m.slot == slot and m.generation_born <= generation]
        return max(born)[1] if born else None

    def hyperparameters_at(self, member_id: int, generation: int) -> dict:
        """The hyperparameters `member_id` trained and was scored with in `generation`.

        A clone or mutation recorded at generation g opens it: it takes effect in generation g. A
        member born after `generation` answers with its parent's (whose weights it copied)."""
        member = self.members[member_id]
        if member.parent_id is not None and member.generation_born > generation:
            return self.hyperparameters_at(member.parent_id, generation)
        settings = [e["hyperparameters"] for e in self.events
                    if e.get("member_id") == member_id and e["kind"] in ("found", "clone", "mutate")
                    and (e["kind"] == "found" or e["generation"] <= generation)]
        return _json_copy(settings[-1])

    def to_dict(self) -> dict:
        return {
            "next_id": self._next_id,
            "members": [m.to_dict() for m in self.members.values()],
            "events": _json_copy(self.events),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Lineage":
        lineage = cls()
        for m in d["members"]:
            info = MemberInfo.from_dict(m)
            lineage.members[info.id] = info
        if lineage.members and d["next_id"] <= max(lineage.members):
            raise ValueError(f"Lineage: next_id {d['next_id']} would reuse an existing member id")
        lineage._next_id = d["next_id"]
        lineage.events = _json_copy(d["events"])
        return lineage

    def _add(self, parent_id, generation, hyperparameters, mutation, kind, slot) -> int:
        member_id = self._next_id
        self._next_id += 1
        self.members[member_id] = MemberInfo(
            member_id, parent_id, generation, mutation, _json_copy(hyperparameters), slot
        )
        self._event(kind, generation, member_id, parent_id, hyperparameters, mutation)
        return member_id

    def _event(self, kind, generation, member_id, parent_id, hyperparameters, mutation) -> None:
        self.record(
            kind,
            generation,
            member_id=member_id,
            parent_id=parent_id,
            hyperparameters=hyperparameters,
            mutation=mutation,
        )
