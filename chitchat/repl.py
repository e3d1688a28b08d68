"""The terminal chat of interact.py: a REPL over `Chatbot`, and its transcripts.

On a terminal: prompts, colours (unless NO_COLOR is set), readline line editing, replies
streamed token by token. Ctrl-D or Ctrl-C at the prompt exits; Ctrl-C during a reply stops
that reply and returns to the prompt.

Piped (stdin not a terminal): each input line is one user turn and stdout gets exactly one
line per turn, the reply, with no prompt or colour. Command output and notices go to stderr,
so scripts can read replies line by line.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import signal
import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

from .chat import Chatbot
from .config import DecodingOptions, InteractConfig, coerce_option
from .dialogue import printable
from .streams import Reply
from .utils import ChitchatError, get_logger

HELP = """commands:
  /reset              forget the conversation
  /history            show the conversation (the utterances the model sees are marked *)
  /set key=value ...  change a decoding option, e.g. /set temperature=0.7 topk=5
                      (with MMI also num_candidates and mmi_weight)
  /set                show the current options
  /help               this text
  /exit, /quit        leave (so do Ctrl-D, and Ctrl-C at the prompt)
Ctrl-C while a reply is printed stops it."""


class Transcript:
    """Appends every turn to samples.txt (GPT2-chitchat's format) and samples.jsonl.

    Each write is flushed and fsync'ed at once, so a crash or kill loses nothing already
    said. The user line is written before the reply is generated.
    """

    def __init__(self, directory: str | os.PathLike, settings: dict):
        d = Path(directory)
        try:
            d.mkdir(parents=True, exist_ok=True)
            self._txt = open(d / "samples.txt", "a", encoding="utf-8")
            self._jsonl = open(d / "samples.jsonl", "a", encoding="utf-8")
        except OSError as e:
            raise ChitchatError(f"cannot write transcripts to {d}: {e.strerror}; pass another "
                                "--save_samples_path (or '' for none)") from None
        self.settings = settings
        self.session = datetime.now().strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        self.turn = 0
        self._write(self._txt, f"聊天记录{datetime.now()}:\n")

    @staticmethod
    def _write(f: TextIO, text: str) -> None:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())

    def user(self, text: str) -> None:
        self._write(self._txt, f"user:{text}\n")

    def bot(self, user_text: str, reply: Reply, options: DecodingOptions) -> None:
        self._write(self._txt, f"chatbot:{reply.text}\n")
        self.turn += 1
        self._record({"turn": self.turn, "user": user_text, "chatbot": reply.text,
                      "finish_reason": reply.finish_reason, "notice": reply.notice,
                      "prompt_tokens": reply.prompt_tokens,
                      "reply_tokens": len(reply.token_ids),
                      "first_token_ms": None if reply.first_token_s is None
                      else round(reply.first_token_s * 1e3, 2),
                      "total_ms": round(reply.total_s * 1e3, 2),
                      "options": dataclasses.asdict(options)})

    def event(self, name: str, **data) -> None:
        self._record({"event": name, **data})

    def _record(self, rec: dict) -> None:
        rec = {"time": datetime.now(timezone.utc).astimezone().isoformat(timespec="milliseconds"),
               "session": self.session, **rec, "settings": self.settings}
        self._write(self._jsonl, json.dumps(rec, ensure_ascii=False) + "\n")

    def close(self) -> None:
        self._txt.close()
        self._jsonl.close()


class Repl:
    def __init__(self, bot: Chatbot, *, stream: bool = True, transcript: Transcript | None = None,
                 stdin: TextIO | None = None, stdout: TextIO | None = None,
                 stderr: TextIO | None = None, interactive: bool | None = None,
                 debug: bool = False):
        self.bot = bot
        self.debug = debug
        self.stream = stream
        self.transcript = transcript
        self.stdin = stdin or sys.stdin
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        self.interactive = self.stdin.isatty() if interactive is None else interactive
        # Command output is for people: on a terminal it goes to stdout, piped to stderr.
        self.info = self.stdout if self.interactive else self.stderr
        color = self.interactive and self.stdout.isatty() and not os.environ.get("NO_COLOR")
        self._readline = False
        if self.interactive and self.stdin is sys.stdin:
            try:
                import readline  # noqa: F401  (line editing and history for input())
                self._readline = True
            except ImportError:  # not on every platform (Windows); input() still works
                pass
        wrap = (lambda s: f"\001{s}\002") if self._readline else (lambda s: s)
        self.user_prompt = (f"{wrap(chr(27) + '[1;32m')}user:{wrap(chr(27) + '[0m')} "
                            if color else "user: ") if self.interactive else ""
        self.bot_prefix = ("\033[1;34mchatbot:\033[0m " if color else "chatbot: ") \
            if self.interactive else ""

    # ---- input ----------------------------------------------------------------------------
    def _read(self) -> str | None:
        """The next line, or None at end of input."""
        if self.interactive and self.stdin is sys.stdin:
            try:
                return input(self.user_prompt)
            except EOFError:
                return None
        if self.interactive:
            self._out(self.user_prompt)
        line = self.stdin.readline()
        return None if line == "" else line.rstrip("\n")

    def _out(self, text: str, f: TextIO | None = None) -> None:
        f = f or self.stdout
        f.write(text)
        f.flush()

    def say(self, text: str) -> None:
        self._out(text + "\n", self.info)

    # ---- the loop -------------------------------------------------------------------------
    def run(self) -> int:
        if self.interactive:
            self.say("chitchat: type a message and press Enter; /help lists commands, "
                     "Ctrl-D exits.")
        while True:
            try:
                line = self._read()
            except KeyboardInterrupt:  # Ctrl-C at the prompt means: leave
                self._out("\n")
                break
            if line is None:  # Ctrl-D / end of piped input
                if self.interactive:
                    self._out("\n")
                break
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if self.command(line) == "exit":
                    break
                continue
            try:
                self.turn(line)
            except ChitchatError as e:  # one unusable line must not end the session
                self.say(f"(not sent: {e})")
                if self.transcript:
                    self.transcript.event("skipped", user=printable(line), reason=str(e))
            except KeyboardInterrupt:  # a second Ctrl-C while a stopped reply is recorded
                self._out("\n")
        return 0

    def turn(self, text: str) -> Reply:
        """One exchange: print the reply (streamed or at once) and record it.

        A message that cannot be sent raises ChitchatError before anything is recorded."""
        text = self.bot.check_message(text)
        if self.transcript:
            self.transcript.user(text)
        pieces = self.bot.stream(text)
        prefixed = False
        try:
            for piece in pieces:
                if not prefixed:  # after any notice the context raised, not before it
                    self._out(self.bot_prefix)
                    prefixed = True
                if self.stream:
                    self._out(piece)
        except KeyboardInterrupt:  # Ctrl-C during a reply: stop it, keep what was said
            pass
        finally:
            pieces.close()
        if not prefixed:
            self._out(self.bot_prefix)
        reply = self.bot.last_reply
        # On disk before the line ends: whoever sees the reply line can rely on the record.
        if self.transcript:
            self.transcript.bot(text, reply, self.bot.options)
        if not self.stream:
            self._out(reply.text)
        if reply.finish_reason == "interrupted" and self.interactive:
            self._out(" [stopped]")
        self._out("\n")
        if self.debug and reply.candidates:
            self._out(format_candidates(reply), self.stderr)
        return reply

    def command(self, line: str) -> str | None:
        name, _, arg = line.partition(" ")
        name = name.lower()
        if name in ("/exit", "/quit"):
            return "exit"
        if name == "/help":
            self.say(HELP + "\noptions: " + ", ".join(self._settings()))
        elif name == "/reset":
            self.bot.reset()
            if self.transcript:
                self.transcript.event("reset")
            self.say("(the conversation is cleared)")
        elif name == "/history":
            self._history()
        elif name == "/set":
            self._set(arg)
        else:
            self.say(f"unknown command {name}; /help lists the commands")
        return None

    def _history(self) -> None:
        h = self.bot.history
        if not h:
            self.say("(no history yet)")
            return
        seen = min(len(h), self.bot.options.max_history_len - 1)  # plus the next message
        for i, u in enumerate(h):
            mark = "*" if i >= len(h) - seen else " "
            self.say(f"{mark} {'user' if i % 2 == 0 else 'chatbot'}: {u}")

    def _set(self, arg: str) -> None:
        if not arg.strip():
            self.say(" ".join(f"{k}={v}" for k, v in self._settings().items()))
            return
        try:
            changes = {}
            for item in arg.split():
                key, eq, value = item.partition("=")
                if not eq:
                    raise ChitchatError(f"/set takes key=value, got {item!r}")
                k, v = coerce_option(key.strip(), value)
                changes[k] = v
            self.bot.set(**changes)
        except ChitchatError as e:  # a typo in a command must not end the session
            self.say(f"error: {e}")
            return
        if self.transcript:
            self.transcript.event("set", changes=changes)
        now = self._settings()
        self.say(" ".join(f"{k}={now[k]}" for k in changes))

    def _settings(self) -> dict:
        out = dataclasses.asdict(self.bot.options)
        if self.bot.mmi is not None:
            out.update(num_candidates=self.bot.mmi.num_candidates, mmi_weight=self.bot.mmi.weight)
        return out


def format_candidates(reply: Reply) -> str:
    """--debug: one line per MMI candidate, the chosen one marked with *."""
    lines = ["[mmi] candidates (fwd = mean log P(reply|context), rev = mean log "
             "P(context|reply), score = (1-w)*fwd + w*rev):"]
    for k, c in enumerate(reply.candidates):
        mark = "*" if c.chosen else " "
        why = f"  [dropped: {c.dropped}]" if c.dropped else ""
        lines.append(f"[mmi] {mark}{k:2d} fwd {c.forward:8.3f}  rev {c.reverse:8.3f}  "
                     f"score {c.score:8.3f}  {c.text!r}{why}")
    chosen = next(c for c in reply.candidates if c.chosen)
    lines.append(f"[mmi] chose {chosen.text!r}"
                 + (f" (fallback: {reply.mmi_fallback})" if reply.mmi_fallback else ""))
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def terminal_foreground(stream: TextIO):
    """Take the terminal's foreground in a process group of our own, for the chat.

    Started by a program that does no job control (make, a script), the chat shares that
    program's process group, so Ctrl-C reaches both: the chat handles it, but make reports
    "*** Interrupt" and stops. Alone in the foreground, the chat is the only one that gets
    it. Started from an interactive shell it already leads its own group: nothing changes.
    """
    try:
        fd = stream.fileno()
        mine = os.getpgrp() == os.getpid() or not os.isatty(fd) or \
            os.tcgetpgrp(fd) != os.getpgrp()
    except (OSError, ValueError, io.UnsupportedOperation):
        mine = True
    if mine:
        yield
        return
    old_group = os.getpgrp()
    # A background group may not set the foreground unless SIGTTOU is ignored meanwhile.
    old_ttou = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    try:
        os.setpgid(0, 0)
        os.tcsetpgrp(fd, os.getpgrp())
    except OSError:
        signal.signal(signal.SIGTTOU, old_ttou)
        yield
        return
    try:
        yield
    finally:
        try:
            os.tcsetpgrp(fd, old_group)
        finally:
            signal.signal(signal.SIGTTOU, old_ttou)


def interact(cfg: InteractConfig) -> int:
    """interact.py: load the model, then chat until the user leaves."""
    from transformers.utils import logging as hf_logging

    log = get_logger()
    hf_logging.disable_progress_bar()  # no "Loading weights" bar in a chat
    m, mmi = cfg.model, cfg.mmi
    bot = Chatbot.from_options(m, cfg.decoding, mmi, cfg.bad_words)
    if sys.stdin.isatty():
        log.info("loaded %s (n_positions %d, %s%s, %s backend)", m.model_path, bot.n_positions,
                 m.dtype, ", int8" if m.quantize else "", m.backend)
        if bot.mmi is not None:
            log.info("MMI: reverse model %s, %d candidates, weight %.2f (replies appear "
                     "once reranked, not streamed)", mmi.mmi_model_path, mmi.num_candidates,
                     mmi.mmi_weight)
    if cfg.debug and bot.mmi is None:
        log.warning("--debug prints MMI candidates; without --mmi_model_path there are none")
    transcript = None
    if cfg.save_samples_path:
        settings = {"model_path": m.model_path, "dtype": m.dtype, "quantize": m.quantize,
                    "backend": m.backend, "bad_words": cfg.bad_words,
                    "mmi_model_path": mmi.mmi_model_path}
        if mmi.mmi_model_path:
            settings.update(num_candidates=mmi.num_candidates, mmi_weight=mmi.mmi_weight)
        transcript = Transcript(cfg.save_samples_path, settings)
    try:  # a reader that went away (BrokenPipeError) ends the session in utils.run_cli
        with terminal_foreground(sys.stdin):
            return Repl(bot, stream=cfg.stream, transcript=transcript, debug=cfg.debug).run()
    finally:
        if transcript:
            transcript.close()
