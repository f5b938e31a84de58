"""The catalogue's `local:` section: validated at load, every refusal naming the file and the key,
and its modules imported and run from the catalogue's directory."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from kappa.exceptions import ConfigurationError
from kappa.local.catalog import LocalSection, Producer, load_local
from kappa.settings import REPO_ROOT


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "catalog.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_the_repository_catalogue_names_the_shop_s_hooks_and_producers() -> None:
    section = load_local(REPO_ROOT / "catalog.yaml")
    assert section.prepare == "examples.shop.oltp:prepare"
    assert section.seed == "examples.shop.oltp:seed"
    assert section.producers == (
        Producer("simulator", "examples.shop.simulator"),
        Producer("oltp-simulator", "examples.shop.oltp"),
        Producer("calls-simulator", "examples.shop.calls"),
    )
    assert section.directory == REPO_ROOT
    from examples.shop.oltp import prepare, seed

    assert section.hook("prepare") is not None and section.hook("seed") is not None
    assert callable(prepare) and callable(seed)


def test_a_catalogue_without_a_local_section_has_no_hooks_and_no_producers(tmp_path) -> None:
    section = load_local(write(tmp_path, "streams: []\n"))
    assert section == LocalSection(tmp_path / "catalog.yaml")
    assert section.hook("prepare") is None and section.hook("seed") is None
    assert section.producers == ()


@pytest.mark.parametrize(
    ("local", "fragment"),
    [
        ("local: [prepare]", "local: expected a mapping"),
        ("local: {start: x:y}", "local: unknown key(s) start"),
        ("local: {prepare: examples.shop.oltp}", "local.prepare: expected module:function"),
        ("local: {seed: 'bad name:seed'}", "local.seed: 'bad name:seed' is not module:function"),
        ("local: {producers: {name: a}}", "local.producers: expected a list"),
        ("local: {producers: [simulator]}", "local.producers[0]: expected a mapping"),
        ("local: {producers: [{name: a}]}", "local.producers[0]: missing module"),
        ("local: {producers: [{name: a, module: m, args: x}]}", "unknown key(s) args"),
        ("local: {producers: [{name: A B, module: m}]}", "local.producers[0], name: 'A B'"),
        ("local: {producers: [{name: daemon, module: m}]}", "'daemon' is one of kappa up's own"),
        ("local: {producers: [{name: a, module: 'm n'}]}", "module: 'm n' is not a module name"),
        (
            "local: {producers: [{name: a, module: no_such_module_here}]}",
            "local.producers[0], module: no_such_module_here is not found from",
        ),
        (
            "local: {producers: [{name: a, module: json}, {name: a, module: json}]}",
            "local.producers: a named twice",
        ),
    ],
)
def test_a_bad_local_section_is_refused_naming_the_file_and_the_key(tmp_path, local, fragment):
    path = write(tmp_path, f"streams: []\n{local}\n")
    with pytest.raises(ConfigurationError) as caught:
        load_local(path)
    message = str(caught.value)
    assert message.startswith(f"KAPPA_CATALOG: {path}: "), message
    assert fragment in message


def test_a_hook_that_cannot_be_imported_names_the_key(tmp_path) -> None:
    section = load_local(write(tmp_path, "local: {prepare: 'no_such_package.hooks:prepare'}\n"))
    with pytest.raises(ConfigurationError, match=r"local\.prepare: cannot import no_such_package"):
        section.hook("prepare")
    section = load_local(write(tmp_path, "local: {seed: 'json:no_such_function'}\n"))
    with pytest.raises(ConfigurationError, match=r"local\.seed: json has no callable"):
        section.hook("seed")


def test_hooks_are_imported_from_and_run_in_the_catalogue_s_directory(tmp_path) -> None:
    package = tmp_path / "local_project_hooks"
    package.mkdir()
    (package / "__init__.py").write_text(
        "import os\n\n"
        "def prepare(settings, conn):\n"
        "    return [os.getcwd(), f'{settings}-{conn}']\n",
        encoding="utf-8",
    )
    (tmp_path / "local_project_producer.py").write_text("", encoding="utf-8")
    section = load_local(
        write(
            tmp_path,
            "local:\n  prepare: local_project_hooks:prepare\n"
            "  producers: [{name: p, module: local_project_producer}]\n",
        )
    )
    assert section.producers == (Producer("p", "local_project_producer"),)
    before, path_before = os.getcwd(), list(sys.path)
    hook = section.hook("prepare")
    assert hook is not None
    assert hook("s", "c") == [str(tmp_path.resolve()), "s-c"]
    assert os.getcwd() == before, "the working directory is restored"
    assert sys.path == path_before, "sys.path is restored"
