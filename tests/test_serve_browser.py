"""Headless Chromium on the voice-chat page, asking through a fake microphone (slow).

`llama-omni serve` runs as a subprocess over a saved tiny checkpoint; Chromium (Debian
package) is driven by playwright-core under node, with the question wav as its
microphone. The page must load, send the recorded question, and show streamed text
and play streamed audio. The screenshot goes to tmp_path, or to the path in
LLAMA_OMNI_SCREENSHOT (how docs/serve/voice-chat.png is made).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import soundfile as sf
import torch
from serve_fixtures import (  # noqa: F401 (fixtures)
    EXAMPLES,
    one_thread_fixture,
    serve_model_fixture,
    serve_vocoder_fixture,
    speech,
)

from llama_omni import packaged
from llama_omni.model.checkpoint import save_checkpoint
from llama_omni.model.vocoder import save_vocoder

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NODE = shutil.which("node")

DRIVER = r"""
const { chromium } = require('playwright-core');
(async () => {
  const [url, wav, shot, profile, chromiumPath] = process.argv.slice(2);
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: chromiumPath, headless: true, viewport: { width: 1200, height: 820 },
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
      '--use-fake-device-for-media-stream', '--use-fake-ui-for-media-stream',
      `--use-file-for-fake-audio-capture=${wav}`, '--autoplay-policy=no-user-gesture-required'],
  });
  const page = context.pages()[0] || await context.newPage();
  const problems = [];
  page.on('pageerror', (e) => problems.push(e.message));
  await page.goto(url);
  await page.waitForSelector('#status.ok', { timeout: 30000 });
  await page.waitForSelector('#examples button', { timeout: 10000 });
  await page.fill('#max_new_tokens', '24');
  await page.dispatchEvent('#max_new_tokens', 'change');
  await page.click('#record');
  await page.waitForTimeout(3500);
  await page.click('#record');
  await page.waitForFunction(() => document.querySelector('.turn .answer')?.dataset.done,
    null, { timeout: 120000 });
  const result = await page.evaluate(() => {
    const turn = document.querySelector('.turn');
    const answer = turn.querySelector('.answer');
    return { user: turn.querySelector('.user').textContent, text: answer.textContent,
      audioMs: +answer.dataset.audioMs || 0, status: answer.dataset.done,
      played: window.chat.player.playedMs, units: turn.querySelector('.units').textContent.trim(),
      latency: turn.querySelector('.latency').textContent,
      errors: [...document.querySelectorAll('.error')].map((e) => e.textContent) };
  });
  result.pageErrors = problems;
  await page.screenshot({ path: shot, fullPage: true });
  console.log(JSON.stringify(result));
  await context.close();
})().catch((e) => { console.error(e); process.exit(1); });
"""


def _node_path() -> str | None:
    """node_modules holding playwright-core: setup.sh's (LLAMA_OMNI_BROWSER=1), else npm's global."""
    if NODE is None:
        return None
    global_root = subprocess.run(
        ["npm", "root", "-g"], capture_output=True, text=True, check=False
    ).stdout.strip()
    for root in (packaged.home() / "browser" / "node_modules", Path(global_root)):
        if (root / "playwright-core").is_dir():
            return str(root)
    return None


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed")
def test_voice_chat_page_in_headless_chromium(serve_model, serve_vocoder, tmp_path):
    node_path = _node_path()
    if node_path is None:
        pytest.skip("node with playwright-core is needed: LLAMA_OMNI_BROWSER=1 bash scripts/setup.sh")
    torch.manual_seed(0)
    save_checkpoint(serve_model, tmp_path / "model")
    save_vocoder(serve_vocoder, tmp_path / "vocoder")
    wav = tmp_path / "question.wav"
    sf.write(wav, speech(), 16000, subtype="PCM_16")
    (tmp_path / "driver.js").write_text(DRIVER)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("llama-omni")),
            "serve",
            "--model",
            str(tmp_path / "model"),
            "--vocoder",
            str(tmp_path / "vocoder"),
            "--port",
            str(port),
        ],
        stdout=(tmp_path / "server.log").open("w"),
        stderr=subprocess.STDOUT,
    )
    shot = Path(os.environ.get("LLAMA_OMNI_SCREENSHOT", tmp_path / "voice-chat.png"))
    try:
        _wait_healthy(f"http://127.0.0.1:{port}/health", server)
        run = subprocess.run(
            [
                NODE,
                str(tmp_path / "driver.js"),
                f"http://127.0.0.1:{port}/",
                str(wav),
                str(shot),
                str(tmp_path / "profile"),
                CHROMIUM,
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            env={**os.environ, "NODE_PATH": node_path},
        )
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert run.returncode == 0, run.stderr[-3000:] + (tmp_path / "server.log").read_text()[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert (
        result["user"].startswith("microphone")
        and not result["errors"]
        and not result["pageErrors"]
    )
    assert (
        result["text"].strip()
        and result["units"]
        and result["status"] in ("completed", "incomplete")
    )
    assert result["audioMs"] > 0 and result["played"] >= result["audioMs"] - 1
    assert "first audio" in result["latency"] and shot.stat().st_size > 10_000


def _wait_healthy(url: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert server.poll() is None, "the server exited"
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError("the server did not come up")
