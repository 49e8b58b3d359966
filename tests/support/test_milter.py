#!/usr/bin/python3
"""The test milter of mortal's filter tests (tests/support/filters.rs,
TestMilter), written with pymilter (Debian's python3-milter, under
/usr/bin/python3).

Usage: test_milter.py inet:PORT@127.0.0.1 RECORD_FILE

What it does is chosen by the local part of each recipient, so that one
process serves every case; a message with several recipients gets the
union of their cases. A local part not in the table (and any letters after
a "+", as in addheader+2) changes nothing: every stage answers CONTINUE.

  local part   stage  what the milter does
  ----------   -----  -----------------------------------------------------
  accept       EOM    ACCEPT
  reject       RCPT   REJECT (this recipient)
  tempfail     RCPT   TEMPFAIL (this recipient)
  discard      EOM    DISCARD
  quarantine   EOM    quarantine("test milter quarantine"), then CONTINUE
  replycode    EOM    setreply("550", "5.7.1", "test milter reject",
                      "second line"), then REJECT (a two-line reply)
  addheader    EOM    addheader("X-Test-Milter", "added")
  insheader    EOM    insheader(0, "X-Inserted-0", "at index 0") and
                      insheader(1, "X-Inserted-1", "at index 1")
  chgheader    EOM    chgheader("Subject", 1, "changed by test milter") and
                      chgheader("X-Delete-Me", 1, "") (deletes it)
  replbody     EOM    replacebody(b"replaced by test milter\r\n")
  addrcpt      EOM    addrcpt("<added@example.test>") and
                      addrcpt("<added-never@example.test>", "NOTIFY=NEVER")
  delrcpt      EOM    delrcpt(the recipient as it came, "<delrcpt@...>")
  chgfrom      EOM    chgfrom("<changed@example.test>")
  progress     EOM    progress() PROGRESS_COUNT times, PROGRESS_PAUSE
                      seconds apart, then CONTINUE
  slow         RCPT   sleeps $TEST_MILTER_SLOW_SECONDS (default 60), then
                      CONTINUE: longer than the MTA's command timeout
  sloweom      EOM    the same at the end of the message (content timeout)
  headers      all    records every event of the message as JSON lines in
                      RECORD_FILE (see below), then CONTINUE

Record lines (one JSON object per line, appended and flushed per event):
  {"event": "connect", "hostname": ..., "family": ..., "address": ..., "port": N}
      (address: the IP address, or the socket path with "port": null)
  {"event": "helo", "name": ...}
  {"event": "mail", "address": "<...>", "params": [...]}
  {"event": "rcpt", "address": "<...>", "params": [...]}
  {"event": "data"}
  {"event": "header", "name": ..., "value": ...}
  {"event": "eoh"}
  {"event": "body", "chunk": ...}    (octets as Latin-1 text: one char each)
  {"event": "eom"}
  {"event": "unknown", "command": ...}   (an SMTP command the MTA did not know)
  {"event": "abort"}                     (the MTA aborted the message)
  {"event": "close"}
each with "macros": {name: value} of the macros MACROS that were set.
Events before the first RCPT are kept until a "headers" recipient shows
that the message is to be recorded; they are written then.

The milter negotiates every modification action it uses (ADDHDRS,
CHGHDRS, CHGBODY, ADDRCPT, ADDRCPT_PAR, DELRCPT, QUARANTINE, CHGFROM).
Its log (one line per callback) goes to standard error.
"""

import json
import os
import sys
import time

import Milter

PROGRESS_COUNT = 3
PROGRESS_PAUSE = 0.2
SLOW_DEFAULT = 60.0

MACROS = ["j", "_", "{daemon_name}", "{daemon_addr}", "v", "i", "{client_addr}",
          "{client_name}", "{mail_addr}", "{rcpt_addr}", "{auth_authen}",
          "{tls_version}", "{cipher}"]

RECORD_FILE = None


def log(*parts):
    print("test_milter:", *parts, file=sys.stderr, flush=True)


def local_part(address):
    address = address.strip("<>")
    local = address.rsplit("@", 1)[0].lower()
    return local.split("+", 1)[0]


class TestMilter(Milter.Base):
    def __init__(self):
        self.cases = set()
        self.pending = []
        self.recipients = []

    def macros(self):
        found = {}
        for name in MACROS:
            value = self.getsymval(name)
            if value is not None:
                found[name] = value
        return found

    def record(self, event, **fields):
        entry = {"event": event, **fields, "macros": self.macros()}
        if "headers" not in self.cases:
            self.pending.append(entry)
            return
        self.flush_record([entry])

    def flush_record(self, entries):
        with open(RECORD_FILE, "a", encoding="utf-8") as out:
            for entry in entries:
                out.write(json.dumps(entry) + "\n")

    def connect(self, hostname, family, hostaddr):
        log("connect", hostname, hostaddr)
        self.pending = []
        if isinstance(hostaddr, tuple):
            address, port = hostaddr[0], hostaddr[1]
        else:
            address, port = hostaddr, None
        self.record("connect", hostname=hostname, family=str(family), address=address, port=port)
        return Milter.CONTINUE

    def hello(self, name):
        log("helo", name)
        self.record("helo", name=name)
        return Milter.CONTINUE

    def envfrom(self, address, *params):
        log("mail", address, params)
        # A new message on the same connection starts afresh.
        self.cases = set()
        self.recipients = []
        self.pending = [e for e in self.pending if e["event"] in ("connect", "helo")]
        self.record("mail", address=address, params=list(params))
        return Milter.CONTINUE

    def envrcpt(self, address, *params):
        case = local_part(address)
        log("rcpt", address, params, "case", case)
        if case == "headers" and "headers" not in self.cases:
            self.cases.add("headers")
            self.flush_record(self.pending)
            self.pending = []
        self.record("rcpt", address=address, params=list(params))
        if case == "reject":
            return Milter.REJECT
        if case == "tempfail":
            return Milter.TEMPFAIL
        if case == "slow":
            time.sleep(float(os.environ.get("TEST_MILTER_SLOW_SECONDS", SLOW_DEFAULT)))
        self.cases.add(case)
        self.recipients.append(address)
        return Milter.CONTINUE

    def data(self):
        self.record("data")
        return Milter.CONTINUE

    def header(self, name, value):
        self.record("header", name=name, value=value)
        return Milter.CONTINUE

    def eoh(self):
        self.record("eoh")
        return Milter.CONTINUE

    def body(self, chunk):
        self.record("body", chunk=chunk.decode("latin-1"))
        return Milter.CONTINUE

    def eom(self):
        cases = self.cases
        log("eom", sorted(cases))
        self.record("eom")
        if "addheader" in cases:
            self.addheader("X-Test-Milter", "added")
        if "insheader" in cases:
            self.addheader("X-Inserted-0", "at index 0", 0)
            self.addheader("X-Inserted-1", "at index 1", 1)
        if "chgheader" in cases:
            self.chgheader("Subject", 1, "changed by test milter")
            self.chgheader("X-Delete-Me", 1, "")
        if "replbody" in cases:
            self.replacebody(b"replaced by test milter\r\n")
        if "addrcpt" in cases:
            self.addrcpt("<added@example.test>")
            self.addrcpt("<added-never@example.test>", "NOTIFY=NEVER")
        if "delrcpt" in cases:
            for address in self.recipients:
                if local_part(address) == "delrcpt":
                    self.delrcpt(address)
        if "chgfrom" in cases:
            self.chgfrom("<changed@example.test>")
        if "quarantine" in cases:
            self.quarantine("test milter quarantine")
        if "progress" in cases:
            for _ in range(PROGRESS_COUNT):
                time.sleep(PROGRESS_PAUSE)
                self.progress()
        if "sloweom" in cases:
            time.sleep(float(os.environ.get("TEST_MILTER_SLOW_SECONDS", SLOW_DEFAULT)))
        if "replycode" in cases:
            self.setreply("550", "5.7.1", "test milter reject", "second line")
            return Milter.REJECT
        if "discard" in cases:
            return Milter.DISCARD
        if "accept" in cases:
            return Milter.ACCEPT
        return Milter.CONTINUE

    def unknown(self, command):
        log("unknown", command)
        self.record("unknown", command=command.decode("latin-1") if isinstance(command, bytes) else command)
        return Milter.CONTINUE

    def abort(self):
        log("abort")
        # Recorded while the case still holds; the next MAIL starts afresh.
        self.record("abort")
        return Milter.CONTINUE

    def close(self):
        log("close")
        if "headers" in self.cases:
            self.record("close")
        return Milter.CONTINUE


def main():
    global RECORD_FILE
    socket, RECORD_FILE = sys.argv[1], sys.argv[2]
    Milter.factory = TestMilter
    Milter.set_flags(Milter.ADDHDRS | Milter.CHGHDRS | Milter.CHGBODY | Milter.ADDRCPT
                     | Milter.ADDRCPT_PAR | Milter.DELRCPT | Milter.QUARANTINE | Milter.CHGFROM)
    log("listening on", socket)
    # The timeout is libmilter's I/O timeout for the MTA's side.
    Milter.runmilter("test_milter", socket, 600)
    log("stopped")


if __name__ == "__main__":
    main()
