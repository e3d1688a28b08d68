"""interact.py and its REPL, driven by a real tiny model: piped input, commands, Ctrl-D,
Ctrl-C (through a real pseudo-terminal), transcripts flushed every turn."""
from __future__ import annotations

import io
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chitchat import Chatbot
from chitchat.dialogue import encode_context
from chitchat.repl import Repl, Transcript

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "NO_COLOR": "1", "TERM": "dumb", "PYTHONUNBUFFERED": "1",
       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def interact(args, stdin_text, **kw):
    return subprocess.run([sys.executable, "interact.py", *map(str, args)], input=stdin_text,
                          capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=120, **kw)


def read_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


# ---- in process -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bot(tiny_model_dir):
    return Chatbot.from_pretrained(tiny_model_dir, seed=0)


def run_repl(bot, text, tmp_path=None, stream=True):
    bot.reset()
    out, err = io.StringIO(), io.StringIO()
    tr = Transcript(tmp_path, {"model_path": "tiny"}) if tmp_path else None
    rc = Repl(bot, stream=stream, transcript=tr, stdin=io.StringIO(text), stdout=out,
              stderr=err, interactive=False).run()
    if tr:
        tr.close()
    return rc, out.getvalue(), err.getvalue()


def test_piped_repl_one_line_per_turn_and_commands(bot, tmp_path):
    text = "你好\n\n   \n/set temperature=0.5 topk=3\n/set nope=1\n/history\n你在干嘛\n/reset\n/bogus\nhi\n"
    rc, out, err = run_repl(bot, text, tmp_path)
    assert rc == 0
    lines = out.splitlines()
    assert len(lines) == 3 and all(lines)  # one reply line per user line, nothing else
    assert "temperature=0.5 topk=3" in err and "unknown option 'nope'" in err
    assert "unknown command /bogus" in err and "cleared" in err
    assert bot.options.temperature == 0.5 and bot.history == ["hi", lines[2]]
    txt = read_lines(tmp_path / "samples.txt")
    assert txt[0].startswith("聊天记录")
    assert txt[1:] == ["user:你好", f"chatbot:{lines[0]}", "user:你在干嘛", f"chatbot:{lines[1]}",
                       "user:hi", f"chatbot:{lines[2]}"]
    recs = [json.loads(l) for l in read_lines(tmp_path / "samples.jsonl")]
    turns = [r for r in recs if "turn" in r]
    assert [r["chatbot"] for r in turns] == lines
    assert [r.get("event") for r in recs if "event" in r] == ["set", "reset"]
    assert turns[1]["options"]["temperature"] == 0.5 and "time" in turns[0]
    assert turns[2]["prompt_tokens"] == len(encode_context(bot.tokenizer, ["hi"]))


def test_exit_commands_stop_reading(bot):
    for cmd in ("/exit", "/quit", "/EXIT"):
        rc, out, _ = run_repl(bot, f"你好\n{cmd}\n你好\n")
        assert rc == 0 and len(out.splitlines()) == 1


def test_no_stream_prints_the_same_reply(bot):
    bot.set(seed=5)
    _, a, _ = run_repl(bot, "你好\n", stream=True)
    bot.set(seed=5)
    _, b, _ = run_repl(bot, "你好\n", stream=False)
    assert a == b and a.strip()


def test_ctrl_c_during_a_reply_returns_to_the_prompt(bot, tmp_path, monkeypatch):
    real = bot.backend.step
    calls = []

    def step(state, tokens):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # where a real Ctrl-C lands: inside the model
        return real(state, tokens)

    monkeypatch.setattr(bot.backend, "step", step)
    rc, out, _ = run_repl(bot, "你好\n再说一次\n", tmp_path)
    assert rc == 0
    lines = out.splitlines()
    assert len(lines) == 2 and bot.history[1] == lines[0]
    recs = [json.loads(l) for l in read_lines(tmp_path / "samples.jsonl")]
    assert [r["finish_reason"] for r in recs] == ["interrupted", "length"]
    assert recs[0]["reply_tokens"] == 4


# ---- the real CLI -----------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_piped_session_is_deterministic_under_seed(tiny_model_dir, tmp_path):
    args = ["--model_path", tiny_model_dir, "--seed", "3", "--save_samples_path", tmp_path / "s"]
    r = interact(args, "你好\n/set max_history_len=1\n你在干嘛\nhello world\n")
    assert r.returncode == 0, r.stderr
    # The same seed through the library gives the same replies: the CLI adds nothing random.
    bot = Chatbot.from_pretrained(tiny_model_dir, seed=3)
    expected = [bot.reply("你好")]
    bot.set(max_history_len=1)
    expected += [bot.reply("你在干嘛"), bot.reply("hello world")]
    assert r.stdout.splitlines() == expected
    recs = [json.loads(l) for l in read_lines(tmp_path / "s" / "samples.jsonl")]
    assert [r["chatbot"] for r in recs if "turn" in r] == expected


@pytest.mark.slow
def test_cli_errors_are_one_line_with_status_2(tmp_path, capsys):
    from chitchat.cli import interact_main  # interact.py's main
    from chitchat.utils import run_cli

    assert run_cli(interact_main, ["--model_path", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "model folder" in err and len(err.splitlines()) == 1
    r = interact([], "")  # argparse-level: no torch is even imported
    assert r.returncode == 2 and "--model_path is required" in r.stderr


@pytest.mark.slow
def test_cli_transcript_is_flushed_every_turn(tiny_model_dir, tmp_path):
    d = tmp_path / "s"
    p = subprocess.Popen([sys.executable, "interact.py", "--model_path", str(tiny_model_dir),
                          "--save_samples_path", str(d)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                         env=ENV)
    try:
        p.stdin.write("你好\n")
        p.stdin.flush()
        reply = p.stdout.readline().rstrip("\n")
        assert reply
        # Still running, input still open: the turn must already be on disk.
        assert read_lines(d / "samples.txt")[1:] == ["user:你好", f"chatbot:{reply}"]
        assert json.loads(read_lines(d / "samples.jsonl")[0])["chatbot"] == reply
        p.kill()  # a kill loses nothing already said
        p.wait(30)
        assert read_lines(d / "samples.txt")[1:] == ["user:你好", f"chatbot:{reply}"]
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(30)
        p.stdin.close()
        p.stdout.close()
        p.stderr.close()


@pytest.mark.slow
def test_cli_gpt2_chitchat_folder(tmp_path):
    from conftest import shared_path
    from test_chat import gpt2_chitchat_folder

    vocab = shared_path("vocab", "gpt2-chitchat-vocab.txt")
    d = gpt2_chitchat_folder(tmp_path / "old", 13317)
    r = interact(["--model_path", d, "--vocab_path", vocab, "--device", "cpu",
                  "--save_samples_path", "", "--quantize", "int8"], "你好\n")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 1 and r.stdout.strip()


# ---- a real terminal --------------------------------------------------------------------------
class Terminal:
    """A child process on a pseudo-terminal that is its controlling terminal, so typing
    \\x03 makes the kernel send SIGINT, exactly as Ctrl-C does."""

    def __init__(self, argv):
        import pty

        self.master, slave = pty.openpty()

        def setup():  # in the child: a new session whose controlling terminal is the pty
            import fcntl
            import termios
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
            # A suite run as a background job (or by some CI wrappers) inherits an ignored
            # SIGINT, and Python keeps it ignored: Ctrl-C would do nothing.
            signal.signal(signal.SIGINT, signal.SIG_DFL)

        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=ROOT,
                                     env=ENV, preexec_fn=setup, close_fds=True)
        os.close(slave)
        self.buf = ""

    def expect(self, text: str, timeout: float = 60) -> str:
        end = time.monotonic() + timeout
        while text not in self.buf:
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {text!r}; got {self.buf[-500:]!r}")
            r, _, _ = select.select([self.master], [], [], left)
            if r:
                try:
                    data = os.read(self.master, 4096)
                except OSError:  # the child closed the terminal
                    data = b""
                if not data:
                    raise AssertionError(f"EOF waiting for {text!r}; got {self.buf[-500:]!r}")
                self.buf += data.decode("utf-8", "replace")
        i = self.buf.index(text) + len(text)
        seen, self.buf = self.buf[:i], self.buf[i:]
        return seen

    def read_some(self, timeout: float = 60) -> str:
        """Wait for at least one more byte of output (anything after the last expect)."""
        end = time.monotonic() + timeout
        while not self.buf:
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError("timed out waiting for output")
            r, _, _ = select.select([self.master], [], [], left)
            if r:
                data = os.read(self.master, 4096)
                if not data:
                    raise AssertionError("EOF waiting for output")
                self.buf += data.decode("utf-8", "replace")
        return self.buf

    def send(self, text: str) -> None:
        os.write(self.master, text.encode("utf-8"))

    def wait(self, timeout: float = 30) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            os.close(self.master)


def slow_interact(model_dir, *args) -> list[str]:
    """interact.py with every decoding step slowed to 50 ms, so a Ctrl-C lands mid-reply."""
    code = ("import sys, time; sys.argv[0] = 'interact.py'; import chitchat.backends.fast as inf; "
            "real = inf.FastGPT2.step; "
            "inf.FastGPT2.step = lambda self, s, t: (time.sleep(0.05), real(self, s, t))[1]; "
            "import interact; from chitchat.utils import run_cli; "
            "sys.exit(run_cli(interact.main))")
    return [sys.executable, "-c", code, "--model_path", str(model_dir), *map(str, args)]


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")
def test_terminal_ctrl_c_stops_a_reply_then_ctrl_c_at_the_prompt_exits(tiny_model_dir, tmp_path):
    t = Terminal(slow_interact(tiny_model_dir, "--max_len", "40", "--min_len", "40",
                               "--save_samples_path", tmp_path))
    try:
        t.expect("user: ")
        t.send("你好\r")
        t.expect("chatbot: ")
        t.read_some()  # the first piece of the reply: it is under way (40 steps of 50 ms)
        t.send("\x03")  # Ctrl-C mid-reply
        t.expect("[stopped]")
        t.expect("user: ")
        t.send("/history\r")
        hist = t.expect("\nuser: ")  # the next prompt, at the start of a line
        assert "* user: 你好" in hist and "* chatbot: " in hist
        t.send("\x03")  # Ctrl-C at the prompt
        assert t.wait() == 0
    finally:
        if t.proc.poll() is None:
            t.proc.kill()
    rec = json.loads(read_lines(tmp_path / "samples.jsonl")[0])
    assert rec["finish_reason"] == "interrupted" and 0 < rec["reply_tokens"] < 40


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")
def test_terminal_ctrl_d_exits(tiny_model_dir):
    t = Terminal([sys.executable, "interact.py", "--model_path", str(tiny_model_dir),
                  "--save_samples_path", ""])
    try:
        t.expect("user: ")
        t.send("你好\r")
        t.expect("chatbot: ")
        t.expect("user: ")
        t.send("\x04")  # Ctrl-D
        assert t.wait() == 0
    finally:
        if t.proc.poll() is None:
            t.proc.kill()
