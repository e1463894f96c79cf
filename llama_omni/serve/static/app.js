'use strict';
// Voice chat over the server's Realtime-style WebSocket API (/v1/realtime).
// Input: microphone (16 kHz PCM16 appends) or a file/example decoded in the browser.
// Output: streamed text, units, and gap-free WebAudio playback of the audio deltas.

const RATE = 16000;             // input and output PCM rate of the session
const SEND_EVERY = RATE / 10;   // microphone samples per append (100 ms)
const $ = (id) => document.getElementById(id);

// ---------------------------------------------------------------- PCM16 <-> base64
function toBase64Pcm16(float32) {
  const bytes = new Uint8Array(float32.length * 2);
  const view = new DataView(bytes.buffer);
  float32.forEach((x, i) => view.setInt16(2 * i, Math.max(-1, Math.min(1, x)) * 32767, true));
  let text = '';
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(text);
}

function fromBase64Pcm16(b64) {
  const raw = atob(b64);
  const view = new DataView(new ArrayBuffer(raw.length));
  for (let i = 0; i < raw.length; i++) view.setUint8(i, raw.charCodeAt(i));
  const out = new Float32Array(raw.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = view.getInt16(2 * i, true) / 32768;
  return out;
}

// ---------------------------------------------------------------- playback
// Each chunk starts exactly where the previous one ends, so the answer plays without gaps.
class Player {
  constructor() { this.ctx = null; this.next = 0; this.sources = []; this.playedMs = 0; }
  play(samples, rate) {
    this.ctx = this.ctx || new AudioContext();
    if (this.ctx.state === 'suspended') this.ctx.resume();
    const buffer = this.ctx.createBuffer(1, samples.length, rate);
    buffer.copyToChannel(samples, 0);
    const source = this.ctx.createBufferSource();
    source.buffer = buffer;
    source.connect(this.ctx.destination);
    this.next = Math.max(this.next, this.ctx.currentTime + 0.05);
    source.start(this.next);
    this.next += buffer.duration;
    this.playedMs += buffer.duration * 1000;
    this.sources.push(source);
    source.onended = () => { this.sources = this.sources.filter((s) => s !== source); };
  }
  flush() {  // barge-in: stop everything scheduled
    this.sources.forEach((s) => s.stop());
    this.sources = [];
    this.next = 0;
  }
}

// ---------------------------------------------------------------- microphone
class Mic {
  async start(onSamples) {
    this.ctx = new AudioContext({ sampleRate: RATE });
    await this.ctx.audioWorklet.addModule('/static/capture-worklet.js');
    this.stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: true } });
    this.node = new AudioWorkletNode(this.ctx, 'capture');
    let pending = [], count = 0;
    this.node.port.onmessage = ({ data }) => {
      pending.push(data); count += data.length;
      if (count >= SEND_EVERY) {
        const all = new Float32Array(count);
        let at = 0;
        pending.forEach((p) => { all.set(p, at); at += p.length; });
        pending = []; count = 0;
        onSamples(all);
      }
    };
    this.ctx.createMediaStreamSource(this.stream).connect(this.node);
  }
  stop() {
    if (!this.ctx) return;
    this.stream.getTracks().forEach((t) => t.stop());
    this.ctx.close();
    this.ctx = null;
  }
}

// Any file the browser can decode (wav, flac, mp3, webm, ogg) -> mono 16 kHz samples.
async function decodeFile(arrayBuffer) {
  const decoded = await new AudioContext().decodeAudioData(arrayBuffer);
  const length = Math.ceil(decoded.duration * RATE);
  const offline = new OfflineAudioContext(1, length, RATE);
  const source = offline.createBufferSource();
  source.buffer = decoded;
  source.connect(offline.destination);
  source.start();
  return (await offline.startRendering()).getChannelData(0);
}

// ---------------------------------------------------------------- the conversation
class Chat {
  constructor() {
    this.player = new Player();
    this.mic = new Mic();
    this.recording = false;
    this.turn = null;       // the DOM article of the answer in progress
    this.sentAt = 0;        // when the user's turn was committed (ms, performance.now)
  }

  connect() {
    const key = $('api_key').value.trim();
    const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
    const ws = new WebSocket(`${scheme}://${location.host}/v1/realtime${key ? '?api_key=' + encodeURIComponent(key) : ''}`);
    ws.onopen = () => { this.status('connected', 'ok'); this.updateSession(); };
    ws.onclose = () => { if (ws === this.ws) this.status('disconnected: reload the page to reconnect', 'bad'); };
    ws.onmessage = (message) => this.onEvent(JSON.parse(message.data));
    this.ws = ws;
  }

  status(text, kind) { $('status').textContent = text; $('status').className = `status ${kind || ''}`; }
  send(event) { if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(event)); }

  updateSession() {
    const omega = parseInt($('chunk_size').value, 10);
    this.send({
      type: 'session.update',
      session: {
        type: 'realtime',
        output_modalities: ['audio'],
        temperature: parseFloat($('temperature').value),
        top_p: parseFloat($('top_p').value),
        max_output_tokens: parseInt($('max_new_tokens').value, 10),
        chunk_size: Number.isFinite(omega) ? omega : 'inf',
        audio: {
          input: {
            format: { type: 'audio/pcm', rate: RATE },
            turn_detection: $('handsfree').checked ? { type: 'server_vad', silence_duration_ms: 600 } : null,
          },
          output: { format: { type: 'audio/pcm', rate: RATE } },
        },
      },
    });
  }

  sendAudio(samples) {
    const step = RATE * 2;  // 2 s per message keeps messages well under the size limit
    for (let i = 0; i < samples.length; i += step) {
      this.send({ type: 'input_audio_buffer.append', audio: toBase64Pcm16(samples.subarray(i, i + step)) });
    }
  }

  ask(samples, label) {  // a whole question at once (upload or example)
    this.send({ type: 'input_audio_buffer.clear' });
    this.sendAudio(samples);
    this.newTurn(`${label} (${(samples.length / RATE).toFixed(1)} s)`);
    this.send({ type: 'input_audio_buffer.commit' });
    this.send({ type: 'response.create' });
  }

  async toggleRecording() {
    const button = $('record');
    if (!this.recording) {
      this.player.flush();
      this.send({ type: 'input_audio_buffer.clear' });
      await this.mic.start((samples) => this.sendAudio(samples));
      this.recording = true;
      this.recordStart = performance.now();
      button.textContent = $('handsfree').checked ? '■ Stop listening' : '■ Stop and send';
      button.classList.add('recording');
      return;
    }
    this.mic.stop();
    this.recording = false;
    button.textContent = '● Record';
    button.classList.remove('recording');
    if (!$('handsfree').checked) {
      this.newTurn(`microphone (${((performance.now() - this.recordStart) / 1000).toFixed(1)} s)`);
      this.send({ type: 'input_audio_buffer.commit' });
      this.send({ type: 'response.create' });
    }
  }

  newTurn(userLabel) {
    const node = $('turn-template').content.firstElementChild.cloneNode(true);
    node.querySelector('.user').textContent = userLabel;
    $('turns').prepend(node);
    this.turn = node;
    this.sentAt = performance.now();
    this.firstAudio = null;
  }

  part(name) { return this.turn ? this.turn.querySelector('.' + name) : document.createElement('div'); }

  onEvent(event) {
    switch (event.type) {
      case 'input_audio_buffer.speech_started':
        this.player.flush();
        this.status('listening…', 'ok');
        break;
      case 'input_audio_buffer.speech_stopped':
        this.newTurn(`spoken turn (${((event.audio_end_ms) / 1000).toFixed(1)} s into the stream)`);
        this.status('connected', 'ok');
        break;
      case 'output_audio_buffer.cleared':
        this.player.flush();
        break;
      case 'response.output_text.delta':
        this.part('answer').textContent += event.delta;
        break;
      case 'response.output_units.delta':
        this.part('units').textContent += event.units.join(' ') + ' ';
        break;
      case 'response.output_audio.delta': {
        if (this.firstAudio === null) this.firstAudio = performance.now() - this.sentAt;
        const samples = fromBase64Pcm16(event.delta);
        this.player.play(samples, event.sample_rate || RATE);
        const answer = this.part('answer');
        answer.dataset.audioMs = Math.round((+answer.dataset.audioMs || 0) + samples.length * 1000 / (event.sample_rate || RATE));
        break;
      }
      case 'response.done': this.showLatency(event.response); break;
      case 'error': this.showError(event.error); break;
      default: break;
    }
  }

  showLatency(response) {
    const ms = response.latency_ms || {};
    const fmt = (x) => (x === null || x === undefined ? '–' : `${Math.round(x)} ms`);
    const parts = [`server: first text ${fmt(ms.first_text)}, first audio ${fmt(ms.first_audio)}, done ${fmt(ms.total)}`];
    if (this.firstAudio !== null) parts.push(`heard here after ${fmt(this.firstAudio)}`);
    if (response.status !== 'completed') parts.push(`(${response.status})`);
    this.part('latency').textContent = parts.join(' · ');
    this.part('answer').dataset.done = response.status;
  }

  showError(error) {
    const node = document.createElement('div');
    node.className = 'error';
    node.textContent = `error: ${error.message}`;
    (this.turn || $('turns')).append(node);
  }
}

async function loadExamples(chat) {
  const key = $('api_key').value.trim();
  const response = await fetch('/v1/examples', { headers: key ? { Authorization: `Bearer ${key}` } : {} });
  if (!response.ok) return;
  for (const example of await response.json()) {
    const button = document.createElement('button');
    button.type = 'button';
    button.textContent = `▶ ${example.text}`;
    button.onclick = async () => {
      const samples = await decodeFile(await (await fetch(example.url)).arrayBuffer());
      chat.ask(samples, `example: "${example.text}"`);
    };
    $('examples').append(button);
  }
}

window.addEventListener('DOMContentLoaded', () => {
  const chat = new Chat();
  window.chat = chat;  // for debugging from the console
  chat.connect();
  loadExamples(chat);
  $('record').onclick = () => chat.toggleRecording().catch((err) => chat.showError({ message: String(err) }));
  $('upload').onchange = async (e) => {
    const file = e.target.files[0];
    if (!file) return;
    try {
      chat.ask(await decodeFile(await file.arrayBuffer()), `upload: ${file.name}`);
    } catch (err) {
      chat.showError({ message: `cannot decode ${file.name}: ${err}` });
    }
    e.target.value = '';
  };
  const reconnect = () => { const old = chat.ws; chat.connect(); old.close(); };
  $('reset').onclick = () => { $('turns').replaceChildren(); reconnect(); };
  ['temperature', 'top_p', 'max_new_tokens', 'chunk_size', 'handsfree'].forEach((id) => {
    $(id).onchange = () => chat.updateSession();
  });
  $('api_key').onchange = reconnect;
});
