"""The fake OpenAI server's fixtures (tests/llm), for the settings tests of openai.transform."""

from tests.llm.conftest import _fake_openai_server, fake_openai  # noqa: F401 - fixtures, found by name
