// The page: a drawing pad and a file input that send an image to POST /predict, and
// what the server answers. Every decision about the image is the server's (the same
// code as `python -m stages.predict`); this file only draws and shows.
//
// document.body.dataset.state is "busy" while a stroke is drawn or an answer is due
// (a busy server's 503 is retried after its Retry-After), and "ready" once the answer
// shown is the one for what was last drawn or sent.
"use strict";

const pad = document.getElementById("pad");
const ink = pad.getContext("2d");
const $ = (id) => document.getElementById(id);

let drawing = null;    // the pointer that draws, while it is down
let pending = null;    // the next to send, if any: {body: a function giving it, tries}
let inFlight = false;
let generation = 0;    // bumped by Clear: answers to older requests are dropped
let retry = null;      // the timer that sends a body again after a 503, while it waits
const RETRIES = 30;    // 503s in a row (each after its Retry-After) before giving up

function setState() {
  const waiting = drawing !== null || inFlight || pending || retry !== null;
  document.body.dataset.state = waiting ? "busy" : "ready";
}

function blank() {
  ink.fillStyle = "#fff";
  ink.fillRect(0, 0, pad.width, pad.height);
  ink.lineWidth = Number(pad.dataset.pen);
  ink.lineCap = "round";
  ink.lineJoin = "round";
  ink.strokeStyle = "#000";
}

function point(event) {
  const box = pad.getBoundingClientRect();
  return [(event.clientX - box.left) * pad.width / box.width,
          (event.clientY - box.top) * pad.height / box.height];
}

pad.addEventListener("pointerdown", (event) => {
  if (drawing !== null) return;
  event.preventDefault();
  pad.setPointerCapture(event.pointerId);
  drawing = event.pointerId;
  const [x, y] = point(event);
  ink.beginPath();
  ink.moveTo(x, y);
  ink.lineTo(x, y);  // a tap leaves a dot
  ink.stroke();
  setState();
});

pad.addEventListener("pointermove", (event) => {
  if (event.pointerId !== drawing) return;
  const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
  for (const e of events.length ? events : [event]) {
    const [x, y] = point(e);
    ink.lineTo(x, y);
  }
  ink.stroke();
});

function endStroke(event) {
  if (event.pointerId !== drawing) return;
  drawing = null;
  sendCanvas();
}
pad.addEventListener("pointerup", endStroke);
pad.addEventListener("pointercancel", endStroke);

function canvasBlob() {
  return new Promise((resolve) => pad.toBlob(resolve, "image/png"));
}

// the file that was sent, shown under the pad as the browser sees it (a drawing is
// on the pad itself: nothing to show). A data: URL, read here: nothing is fetched
let reading = null;  // the FileReader of the file to show, while it reads

function showSent(file) {
  const image = $("sent-image");
  if (reading) reading.abort();
  reading = null;
  image.onload = image.onerror = null;
  image.removeAttribute("src");
  $("sent").hidden = !file;
  if (!file) return;
  $("sent-caption").textContent = "What was sent";
  image.onload = () => {
    $("sent-caption").textContent = `What was sent: ${image.naturalWidth}×${image.naturalHeight} pixels`;
  };
  image.onerror = () => {
    $("sent-caption").textContent = "What was sent: this browser cannot show its format; the server reads it all the same";
  };
  const reader = new FileReader();
  reader.onload = () => {
    reading = null;
    image.src = reader.result;
  };
  reading = reader;
  reader.readAsDataURL(file);
}

function sendCanvas() {
  $("source").textContent = "the pad";
  showSent(null);
  queue(canvasBlob);
}

function sendFile(file) {
  if (!file) return;
  $("source").textContent = `file: ${file.name}`;
  showSent(file);
  queue(() => Promise.resolve(file));
}

// one request at a time; a newer drawing replaces one that waits, or waits to retry
function queue(body) {
  pending = {body, tries: 0};
  clearTimeout(retry);
  retry = null;
  pump();
}

async function pump() {
  setState();
  if (inFlight || !pending) return;
  const sent = pending;
  pending = null;
  inFlight = true;
  const mine = generation;
  try {
    const response = await fetch("predict", {method: "POST", body: await sent.body()});
    const doc = await response.json().catch(() => ({error: `${response.status} ${response.statusText}`}));
    if (mine !== generation) return;
    if (response.ok) {
      show(doc);
    } else if (response.status === 503 && !pending && sent.tries < RETRIES) {
      // busy: the same body again after the wait the server asks for
      const seconds = Math.max(1, Number(response.headers.get("Retry-After")) || 1);
      sent.tries += 1;
      complain(`the server is busy; trying again in ${seconds} s (${sent.tries} of ${RETRIES})`);
      retry = setTimeout(() => {
        retry = null;
        if (mine === generation && !pending) pending = sent;
        pump();
      }, 1000 * seconds);
    } else {
      complain(doc.error || `${response.status} ${response.statusText}`);
    }
  } catch (err) {
    if (mine === generation) complain(`the server did not answer (${err.message}); is it still running?`);
  } finally {
    inFlight = false;
    pump();
  }
}

function complain(text) {
  $("answer").hidden = true;
  $("message").textContent = text;
  $("message").hidden = false;
}

function show(doc) {
  $("message").hidden = true;
  $("answer").hidden = false;
  $("digit").textContent = doc.digit;
  $("probability").textContent = doc.probability.toFixed(4);
  $("flag").hidden = doc.looks_like_digit !== false;
  $("nocheck").hidden = doc.looks_like_digit !== null;
  const bars = $("bars");
  bars.replaceChildren(...doc.probabilities.map((p, d) => {
    const bar = document.createElement("div");
    bar.className = d === doc.digit ? "bar top" : "bar";
    bar.dataset.digit = d;
    bar.dataset.p = p;
    bar.title = `${d}: ${p.toFixed(4)}`;
    const fill = document.createElement("div");
    fill.className = "fill";
    fill.style.height = `${(100 * p).toFixed(1)}%`;
    const label = document.createElement("div");
    label.className = "label";
    label.textContent = d;
    bar.append(fill, label);
    return bar;
  }));
  const seen = $("seen").getContext("2d");
  const image = seen.createImageData(28, 28);
  doc.seen.forEach((v, i) => image.data.set([v, v, v, 255], 4 * i));
  seen.putImageData(image, 0, 0);
}

$("clear").addEventListener("click", () => {
  generation += 1;
  pending = null;
  clearTimeout(retry);
  retry = null;
  blank();
  $("answer").hidden = true;
  $("message").hidden = true;
  $("source").textContent = "";
  showSent(null);
  setState();
});
$("predict").addEventListener("click", sendCanvas);
$("file").addEventListener("change", (event) => {
  sendFile(event.target.files[0]);
  event.target.value = "";  // the same file again is a new choice
});

for (const name of ["dragenter", "dragover"]) {
  pad.addEventListener(name, (event) => { event.preventDefault(); pad.classList.add("dragging"); });
}
pad.addEventListener("dragleave", () => pad.classList.remove("dragging"));
pad.addEventListener("drop", (event) => {
  event.preventDefault();
  pad.classList.remove("dragging");
  sendFile(event.dataTransfer.files[0]);
});

blank();
setState();
