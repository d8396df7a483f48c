// A small markdown renderer that builds DOM nodes and never parses HTML.
//
// Every piece of text reaches the page through createTextNode / textContent, so model output such as
// `<img src=x onerror=...>` shows as those characters. Supported: paragraphs (single newlines kept as line
// breaks), ATX headings, fenced code blocks (with a language label and a copy button; an unclosed fence renders
// as code, so a streaming reply looks right), blockquotes, ordered and unordered lists (nested by indentation),
// tables, horizontal rules, and inline code, bold, italic, strikethrough, links (http, https and mailto only;
// images render as links, so the page never loads a remote resource) and backslash escapes.

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)/;
const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const RULE = /^ {0,3}([-*_])(?:\s*\1){2,}\s*$/;
const QUOTE = /^ {0,3}> ?/;
const ITEM = /^( *)([-*+]|\d{1,9}[.)])\s+(.*)$/;
const TABLE_SEPARATOR = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;
const SAFE_PROTOCOLS = new Set(["http:", "https:", "mailto:"]);

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// ---- inline ------------------------------------------------------------------------------------------------

const INLINE = new RegExp(
  [
    /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/.source, // 1, 2: code span
    /\*\*(?=\S)([\s\S]*?\S)\*\*/.source, // 3: bold
    /__(?=\S)([\s\S]*?\S)__(?!\w)/.source, // 4: bold
    /~~(?=\S)([\s\S]*?\S)~~/.source, // 5: strikethrough
    /\*(?=[^\s*])([\s\S]*?[^\s*])\*/.source, // 6: italic
    /(?<![\w\\])_(?=[^\s_])([\s\S]*?[^\s_])_(?!\w)/.source, // 7: italic
    /!?\[([^\]\n]*)\]\(\s*<?([^\s)<>]+)>?(?:\s+"[^"\n]*")?\s*\)/.source, // 8, 9: link or image
    /\\([\\`*_{}[\]()#+\-.!~|>])/.source, // 10: escape
    /(https?:\/\/[^\s<>()]*[^\s<>().,;:!?'"*_~])/.source, // 11: bare URL
  ].join("|"),
  "g",
);

/** A link node when `href` is an absolute http(s) or mailto URL, else null. */
export function safeLink(href) {
  let url;
  try {
    url = new URL(href);
  } catch {
    return null;
  }
  if (!SAFE_PROTOCOLS.has(url.protocol)) return null;
  const a = el("a");
  a.href = url.href;
  a.rel = "noopener noreferrer nofollow";
  a.target = "_blank";
  return a;
}

function renderInline(text, parent) {
  const inline = new RegExp(INLINE); // its own lastIndex: bold and italic recurse
  let last = 0;
  for (let m = inline.exec(text); m !== null; m = inline.exec(text)) {
    if (m.index > last) parent.append(text.slice(last, m.index));
    last = inline.lastIndex;
    if (m[2] !== undefined) {
      parent.append(el("code", "", m[2].length > 2 && m[2].startsWith(" ") && m[2].endsWith(" ") ? m[2].slice(1, -1) : m[2]));
    } else if (m[3] !== undefined || m[4] !== undefined) {
      renderInline(m[3] ?? m[4], parent.appendChild(el("strong")));
    } else if (m[5] !== undefined) {
      renderInline(m[5], parent.appendChild(el("del")));
    } else if (m[6] !== undefined || m[7] !== undefined) {
      renderInline(m[6] ?? m[7], parent.appendChild(el("em")));
    } else if (m[9] !== undefined) {
      const a = safeLink(m[9]);
      if (a === null) {
        parent.append(m[0]); // not a URL we link to: the text as written
      } else {
        parent.appendChild(a).textContent = m[8] || m[9]; // plain text: no link inside a link
      }
    } else if (m[10] !== undefined) {
      parent.append(m[10]);
    } else {
      const a = safeLink(m[11]);
      if (a === null) parent.append(m[11]);
      else parent.appendChild(a).textContent = m[11];
    }
  }
  if (last < text.length) parent.append(text.slice(last));
}

function renderLines(lines, parent) {
  lines.forEach((line, i) => {
    if (i > 0) parent.append(el("br"));
    renderInline(line, parent);
  });
}

// ---- blocks ------------------------------------------------------------------------------------------------

async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    await navigator.clipboard.writeText(text);
    return;
  }
  // Plain-http pages on another host have no clipboard API: select a hidden textarea and copy it.
  const area = el("textarea");
  area.value = text;
  area.setAttribute("readonly", "");
  area.className = "offscreen";
  document.body.append(area);
  area.select();
  const ok = document.execCommand("copy");
  area.remove();
  if (!ok) throw new Error("copy refused");
}

/** A copy button for `text` (code blocks and whole messages share it). */
export function copyButton(text, label = "Copy") {
  const button = el("button", "copy", label);
  button.type = "button";
  button.addEventListener("click", async () => {
    try {
      await copyText(text);
      button.textContent = "Copied";
    } catch {
      button.textContent = "Copy failed";
    }
    setTimeout(() => (button.textContent = label), 1500);
  });
  return button;
}

function codeBlock(code, language) {
  const figure = el("figure", "code");
  const bar = figure.appendChild(el("div", "code-bar"));
  bar.append(el("span", "lang", language || "code"), copyButton(code));
  const pre = figure.appendChild(el("pre"));
  const inner = pre.appendChild(el("code", "", code));
  if (language) inner.dataset.lang = language;
  return figure;
}

function splitRow(line) {
  let row = line.trim();
  if (row.startsWith("|")) row = row.slice(1);
  if (row.endsWith("|") && !row.endsWith("\\|")) row = row.slice(0, -1);
  return row.split(/(?<!\\)\|/).map((cell) => cell.trim().replace(/\\\|/g, "|"));
}

function table(lines) {
  const wrap = el("div", "table-wrap");
  const t = wrap.appendChild(el("table"));
  const head = t.appendChild(el("thead")).appendChild(el("tr"));
  const aligns = splitRow(lines[1]).map((c) =>
    c.startsWith(":") && c.endsWith(":") ? "center" : c.endsWith(":") ? "right" : "",
  );
  splitRow(lines[0]).forEach((cell, i) => {
    const th = head.appendChild(el("th"));
    if (aligns[i]) th.style.textAlign = aligns[i];
    renderInline(cell, th);
  });
  const body = t.appendChild(el("tbody"));
  for (const line of lines.slice(2)) {
    const tr = body.appendChild(el("tr"));
    splitRow(line).forEach((cell, i) => {
      const td = tr.appendChild(el("td"));
      if (aligns[i]) td.style.textAlign = aligns[i];
      renderInline(cell, td);
    });
  }
  return wrap;
}

function isBlockStart(line, next) {
  return (
    FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || ITEM.test(line) ||
    (line.includes("|") && next !== undefined && TABLE_SEPARATOR.test(next) && next.includes("-"))
  );
}

function list(lines, start, parent) {
  const first = ITEM.exec(lines[start]);
  const indent = first[1].length;
  const ordered = /\d/.test(first[2]);
  const node = el(ordered ? "ol" : "ul");
  if (ordered && parseInt(first[2], 10) !== 1) node.start = parseInt(first[2], 10);
  let i = start;
  while (i < lines.length) {
    const m = ITEM.exec(lines[i]);
    if (!m || m[1].length !== indent || /\d/.test(m[2]) !== ordered) break;
    const body = [m[3]];
    i += 1;
    // The item goes on over deeper-indented lines (nested lists, continued text) and lazy continuation lines.
    while (i < lines.length) {
      const line = lines[i];
      const item = ITEM.exec(line);
      if (line.trim() === "") {
        const next = lines[i + 1];
        if (next === undefined || next.search(/\S/) <= indent) break;
        body.push("");
      } else if (item && item[1].length <= indent) {
        break;
      } else if (line.search(/\S/) > indent) {
        body.push(line.slice(Math.min(line.search(/\S/), indent + m[2].length + 1)));
      } else if (!isBlockStart(line, lines[i + 1])) {
        body.push(line.trim());
      } else {
        break;
      }
      i += 1;
    }
    const li = node.appendChild(el("li"));
    renderBlocks(body, li, true);
  }
  parent.append(node);
  return i;
}

function renderBlocks(lines, parent, tight = false) {
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (line.trim() === "") {
      i += 1;
      continue;
    }
    const fence = FENCE.exec(line);
    if (fence) {
      const code = [];
      i += 1;
      while (i < lines.length && !new RegExp(`^ {0,3}${fence[1][0]}{${fence[1].length},}\\s*$`).test(lines[i])) {
        code.push(lines[i]);
        i += 1;
      }
      i += 1; // the closing fence (or the end of an unfinished block)
      parent.append(codeBlock(code.join("\n"), fence[2]));
      continue;
    }
    const heading = HEADING.exec(line);
    if (heading) {
      renderInline(heading[2], parent.appendChild(el(`h${heading[1].length}`)));
      i += 1;
      continue;
    }
    if (RULE.test(line)) {
      parent.append(el("hr"));
      i += 1;
      continue;
    }
    if (QUOTE.test(line)) {
      const quoted = [];
      while (i < lines.length && QUOTE.test(lines[i])) quoted.push(lines[i++].replace(QUOTE, ""));
      renderBlocks(quoted, parent.appendChild(el("blockquote")));
      continue;
    }
    if (ITEM.test(line)) {
      i = list(lines, i, parent);
      continue;
    }
    if (line.includes("|") && i + 1 < lines.length && TABLE_SEPARATOR.test(lines[i + 1]) && lines[i + 1].includes("-")) {
      const rows = [line, lines[i + 1]];
      i += 2;
      while (i < lines.length && lines[i].includes("|") && lines[i].trim() !== "") rows.push(lines[i++]);
      parent.append(table(rows));
      continue;
    }
    const para = [line];
    i += 1;
    while (i < lines.length && lines[i].trim() !== "" && !isBlockStart(lines[i], lines[i + 1])) para.push(lines[i++]);
    const trimmed = para.map((l) => l.trim());
    if (tight && parent.tagName === "LI" && parent.childNodes.length === 0) {
      renderLines(trimmed, parent); // a one-paragraph list item needs no <p>
    } else {
      renderLines(trimmed, parent.appendChild(el("p")));
    }
  }
}

/** Markdown text -> a DocumentFragment of plain DOM nodes (no HTML is ever parsed). */
export function renderMarkdown(text) {
  const fragment = document.createDocumentFragment();
  renderBlocks(String(text).replace(/\r\n?/g, "\n").split("\n"), fragment);
  return fragment;
}
