/* lowmemws.js - a dependency-free browser client of the lowmemws.v1 envelope subprotocol.
 *
 * It keeps one WebSocket open to a lowmemws gateway with history on, reconnects after any
 * failure (exponential backoff with full jitter), detects a dead link with its own heartbeat
 * deadline, and resumes from the last position it handed over per stream, so the
 * application gets each stored message once, in order. Where the gateway cannot fill a gap
 * (history lost or too short) it calls onrefresh: reload that state, later messages follow.
 * The wire format is docs/envelope.md.
 *
 *   const client = new LowMemWS("/ws", {
 *     onmessage(data, meta) {},          // meta: {stream, epoch, offset} (stream null if none)
 *     onrefresh(stream, epoch, offset) {},
 *     onstatus(status) {},               // "connecting", "open", "synced", "closed"
 *     storageKey: "mail-positions",      // keeps positions across page loads (sessionStorage)
 *     positions: {"t:mail": ["9f3a", 12]}, // where the page's state stands (Gateway.positions)
 *   });
 */
(function (root) {
  "use strict";

  var PROTOCOL = "lowmemws.v1";

  function LowMemWS(url, options) {
    var o = options || {};
    this.url = absoluteURL(url);
    this.onmessage = o.onmessage || function () {};
    this.onrefresh = o.onrefresh || function () {};
    this.onstatus = o.onstatus || function () {};
    this.backoffBase = o.backoffBase || 250; /* ms */
    this.backoffCap = o.backoffCap || 10000;
    this.heartbeatInterval = o.heartbeatInterval || 20000; /* ms of silence before a ping */
    this.heartbeatTimeout = o.heartbeatTimeout || 10000; /* ms to answer it */
    this.storageKey = o.storageKey || null;
    /* the page's positions, read with its state, win over saved ones (older than it) */
    this.positions = o.positions ? JSON.parse(JSON.stringify(o.positions)) : this._load() || {};
    this.connects = 0;
    this._awaiting = {};
    this._attempt = 0;
    this._closed = false;
    this._ws = null;
    this._timer = null;
    this._connect();
  }

  function absoluteURL(url) {
    if (/^wss?:/.test(url)) return url;
    var l = root.location;
    return (l.protocol === "https:" ? "wss://" : "ws://") + l.host + url;
  }

  LowMemWS.prototype.send = function (data) {
    if (!this._ws || this._ws.readyState !== 1) throw new Error("lowmemws: not connected");
    this._ws.send(data);
  };

  LowMemWS.prototype.close = function () {
    this._closed = true;
    clearTimeout(this._timer);
    if (this._ws) this._ws.close(1000);
  };

  /* dropLink closes the socket as a network failure would (for tests): it reconnects. */
  LowMemWS.prototype.dropLink = function () {
    if (this._ws) this._ws.close(4000, "dropped");
  };

  LowMemWS.prototype._load = function () {
    try {
      var saved = this.storageKey && root.sessionStorage.getItem(this.storageKey);
      return saved ? JSON.parse(saved) : null;
    } catch (e) {
      return null;
    }
  };

  LowMemWS.prototype._save = function () {
    if (!this.storageKey) return;
    try {
      root.sessionStorage.setItem(this.storageKey, JSON.stringify(this.positions));
    } catch (e) {
      /* storage full or denied: positions live in memory only */
    }
  };

  LowMemWS.prototype._connect = function () {
    var self = this;
    var resume = encodeURIComponent(JSON.stringify(this.positions));
    var sep = this.url.indexOf("?") < 0 ? "?" : "&";
    this.onstatus("connecting");
    var ws = new WebSocket(this.url + sep + "lmw_resume=" + resume, PROTOCOL);
    this._ws = ws;
    this._awaiting = {};
    for (var s in this.positions) this._awaiting[s] = true;
    ws.onopen = function () {
      if (ws.protocol !== PROTOCOL) {
        ws.close(1000);
        return;
      }
      self.connects += 1;
      self._attempt = 0;
      self.onstatus("open");
      self._alive();
    };
    ws.onmessage = function (event) {
      self._alive();
      self._received(event.data);
    };
    ws.onclose = function () {
      self._lost(ws);
    };
  };

  /* _lost schedules the next connection once ws is gone (closed, or abandoned). */
  LowMemWS.prototype._lost = function (ws) {
    var self = this;
    clearTimeout(this._timer);
    if (this._ws !== ws) return;
    this._ws = null;
    this.onstatus("closed");
    if (this._closed) return;
    var delay = Math.min(this.backoffCap, this.backoffBase * Math.pow(2, this._attempt));
    this._attempt += 1;
    this._timer = setTimeout(function () {
      self._connect();
    }, Math.random() * delay); /* full jitter: a restart is not met by a stampede */
  };

  /* _alive restarts the heartbeat: after heartbeatInterval of silence a ping is sent, and
   * without any answer within heartbeatTimeout the link is taken for dead. */
  LowMemWS.prototype._alive = function () {
    var self = this;
    clearTimeout(this._timer);
    this._timer = setTimeout(function () {
      var ws = self._ws;
      if (!ws) return;
      try {
        ws.send('{"lmw_ping":1}');
      } catch (e) {
        /* closing already */
      }
      self._timer = setTimeout(function () {
        if (self._ws !== ws) return;
        /* a dead path never completes a closing handshake: abandon the socket now */
        ws.onmessage = ws.onclose = null;
        ws.close(4001, "heartbeat deadline");
        self._lost(ws);
      }, self.heartbeatTimeout);
    }, this.heartbeatInterval);
  };

  LowMemWS.prototype._received = function (text) {
    var body = null;
    if (typeof text === "string" && text.charAt(0) === "{") {
      try {
        body = JSON.parse(text);
      } catch (e) {
        body = null;
      }
    }
    if (!body || !("d" in body || "b" in body || "resumed" in body || "refresh" in body ||
                   "synced" in body || "resync" in body || "pong" in body)) {
      this.onmessage(text, {stream: null, epoch: "", offset: 0}); /* not an envelope */
      return;
    }
    if ("resumed" in body || "refresh" in body) return this._outcome(body);
    if ("synced" in body) return this.onstatus("synced");
    if ("resync" in body) return this._resync();
    if ("pong" in body) return;
    var data = "d" in body ? body.d : base64Bytes(body.b);
    var stream = body.s;
    if (typeof stream !== "string") return this.onmessage(data, {stream: null, epoch: "", offset: 0});
    var epoch = body.e, offset = body.o, known = this.positions[stream];
    if (known && known[0] === "" && known[1] === 0) known = null; /* no message yet */
    if (known && known[0] === epoch) {
      if (offset <= known[1]) return; /* seen already */
      if (offset > known[1] + 1) return this._repair(stream, known); /* replayed in order */
    } else if (known && this._awaiting[stream]) {
      return; /* another epoch while a repair runs: its outcome says what to do */
    } else if (known) {
      this.onrefresh(stream, epoch, offset - 1); /* history lost on a live link */
    }
    this.positions[stream] = [epoch, offset];
    this._save();
    this.onmessage(data, {stream: stream, epoch: epoch, offset: offset});
  };

  LowMemWS.prototype._outcome = function (body) {
    var resumed = "resumed" in body;
    var stream = resumed ? body.resumed : body.refresh;
    delete this._awaiting[stream];
    var known = this.positions[stream];
    var ahead = known && known[0] === body.e && known[1] >= body.o;
    if (!resumed && !ahead) {
      this.positions[stream] = [body.e, body.o];
      this._save();
      this.onrefresh(stream, body.e, body.o);
    } else if (resumed && (!known || (known[0] === "" && known[1] === 0) ||
                           (known[0] === body.e && !ahead))) {
      this.positions[stream] = [body.e, body.o];
      this._save();
    }
  };

  LowMemWS.prototype._resync = function () {
    for (var s in this.positions) this._repair(s, this.positions[s]);
  };

  LowMemWS.prototype._repair = function (stream, known) {
    if (this._awaiting[stream] || !this._ws) return;
    this._awaiting[stream] = true;
    var request = {lmw_resume: {}};
    request.lmw_resume[stream] = [known[0], known[1]];
    this._ws.send(JSON.stringify(request));
  };

  function base64Bytes(text) {
    var raw = root.atob(text || ""), bytes = new Uint8Array(raw.length);
    for (var i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
    return bytes;
  }

  root.LowMemWS = LowMemWS;
})(typeof window !== "undefined" ? window : this);
