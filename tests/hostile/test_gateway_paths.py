"""The MCP gateway's path rules against 26 ways out of a confined folder.

The real npm filesystem server is allowed a whole folder (`notes/`, `private/` and more),
so that only tether stands between a client and a write outside `notes/`. The policy is
the shipped example (`examples/gateway/policy.yaml`), its confinement rule as written, its
folder replaced by this test's; the changes it sends to a person are allowed here, so that
any call the rule lets through reaches the server. Symlinked folders and files, `..`,
absolute paths, repeated slashes, trailing dots, relative paths, `~`, a Unicode look-alike
of a symlink's name, edits, moves and new folders: nothing may change outside `notes/`.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shlex
import sys
import unicodedata
from pathlib import Path
from typing import Any

import pytest
import yaml
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.types import CallToolResult

from mcp_servers import filesystem_server

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "gateway" / "policy.yaml"
PLACEHOLDER = "/home/me/notes"


def confined_to(notes: Path) -> str:
    """The example policy for `notes`, its `ask` for changes turned into `allow`."""
    text = EXAMPLE.read_text()
    assert text.count(PLACEHOLDER) >= 4, "the example's folder is the placeholder this test replaces"
    policy = yaml.safe_load(text.replace(PLACEHOLDER, str(notes)))
    for rule in policy["rules"]:
        if rule["decision"] == "ask":
            rule["decision"] = "allow"
            del rule["approver"], rule["expires_in"]
    return yaml.safe_dump(policy)


def snapshot(folder: Path, notes: Path) -> dict[str, str]:
    """Every file, folder and link under `folder` outside `notes`, with what it holds."""
    seen: dict[str, str] = {}
    for parent, dirs, files in os.walk(folder):  # symlinks are listed, never followed
        here = Path(parent)
        if here == notes or notes in here.parents:
            continue
        for name in dirs + files:
            path = here / name
            if path.is_symlink():
                seen[str(path)] = "link -> " + os.readlink(path)
            elif path.is_dir():
                seen[str(path)] = "dir"
            else:
                seen[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return seen


@pytest.fixture
def world(tmp_path: Path) -> dict[str, Path]:
    folder = tmp_path.resolve() / "scope" / "world"  # the journal and logs stay out of scope/
    notes, private = folder / "notes", folder / "private"
    (notes / "sub").mkdir(parents=True)
    private.mkdir()
    (notes / "ok.txt").write_text("ok\n")
    (private / "secret.txt").write_text("secret\n")
    (notes / "link_dir").symlink_to("../private")
    (notes / "link_file").symlink_to("../private/secret.txt")
    (notes / "sub" / "up").symlink_to("../..")
    (notes / "dangling").symlink_to("../private/created-through-a-dangling-link.txt")
    (notes / unicodedata.normalize("NFD", "línk")).symlink_to("../private")
    return {"folder": folder, "notes": notes, "private": private, "home": Path.home()}


def attempts(w: dict[str, Path]) -> list[tuple[str, dict[str, Any]]]:
    n, f = str(w["notes"]), str(w["folder"])

    def write(path: str) -> tuple[str, dict[str, Any]]:
        return "write_file", {"path": path, "content": "escaped\n"}

    return [
        write(f"{n}/link_dir/a01.txt"),  # a symlinked folder
        write(f"{n}/link_file"),  # a symlinked file: would overwrite private/secret.txt
        write(f"{n}/../private/a03.txt"),
        write(f"{n}/./../private/a04.txt"),
        write(f"{n}//..//private/a05.txt"),  # double slashes
        write(f"{f}/private/a06.txt"),  # plainly outside
        write(f"{f}//private//a07.txt"),
        write(f"{n}/sub/up/private/a08.txt"),  # a symlink to an ancestor
        write(f"{n}/sub/up/a09.txt"),
        write(f"{n}/link_dir/../a10.txt"),  # `..` after a symlink: two readings
        write(f"{n}/sub/../link_dir/a11.txt"),
        write(f"{n}/link_dir/./a12.txt"),
        write(f"{n}/link_dir/missing/../a13.txt"),
        write(f"{n}/dangling"),  # a symlink to a file that does not exist yet
        write(f"{n}/link_dir./a15.txt"),  # trailing dots are names of their own
        write(f"{n}/link_dir/a16.txt."),
        write(f"{n}/link_dir/"),
        write("~/tether-escaped-a18.txt"),
        write("notes/link_dir/a19.txt"),  # relative: the server resolves it against its folder
        write("private/a20.txt"),
        write("../a21.txt"),
        write(f"{n}/{unicodedata.normalize('NFC', 'línk')}/a22.txt"),  # the symlink's look-alike
        ("edit_file", {"path": f"{n}/link_file", "edits": [{"oldText": "secret", "newText": "escaped"}]}),
        ("create_directory", {"path": f"{n}/link_dir/a24"}),
        ("move_file", {"source": f"{n}/ok.txt", "destination": f"{n}/link_dir/a25.txt"}),
        ("move_file", {"source": f"{f}/private/secret.txt", "destination": f"{n}/stolen.txt"}),
    ]


async def calls(folder: Path, policy: Path, db: Path, todo: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    fs = shlex.join([*filesystem_server(), str(folder)])
    args = ["-m", "tether", "mcp-gateway", "--upstream", fs, "--policy", str(policy), "--db", str(db)]
    env = {"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else None
    params = StdioServerParameters(command=sys.executable, args=args, cwd=str(folder), env=env)
    results: list[CallToolResult] = []
    with (db.parent / "gateway.log").open("w") as errlog:
        async with (
            stdio_client(params, errlog=errlog) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            for tool, arguments in todo:
                results.append(await session.call_tool(tool, arguments))
            fine = await session.call_tool(
                "write_file", {"path": f"{folder}/notes/sub/../fine.txt", "content": "x"}
            )
    return [*results, fine]


def test_26_ways_out_of_a_confined_folder_write_nothing_outside_it(
    tmp_path: Path, world: dict[str, Path]
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(confined_to(world["notes"]))
    before = snapshot(world["folder"].parent, world["notes"])
    todo = attempts(world)
    assert len(todo) == 26

    *results, fine = asyncio.run(calls(world["folder"], policy, tmp_path / "tether.db", todo))

    assert not fine.is_error, fine  # the confinement is not a wall around everything
    assert (world["notes"] / "fine.txt").read_text() == "x"
    after = snapshot(world["folder"].parent, world["notes"])
    changed = sorted(set(before.items()) ^ set(after.items()))
    assert changed == [], f"written outside notes/: {changed}"
    assert (world["private"] / "secret.txt").read_text() == "secret\n"
    assert not (world["home"] / "tether-escaped-a18.txt").exists()
    codes = []
    for (tool, arguments), result in zip(todo, results, strict=True):
        assert result.is_error, (tool, arguments, result)
        codes.append(result.structured_content["reason_code"] if result.structured_content else None)
    # All but one are refused before the server is called; the one whose path resolves
    # inside notes/ (`link_dir.` is a name of its own, which does not exist) fails there.
    assert codes.count("tool_error") == 1 and codes[14] == "tool_error", codes
    assert set(codes) - {"tool_error"} <= {"policy_denied", "policy_error"}, codes
