// Live updates from the tasks' server-sent events, without reloading the page:
// on a task's page its status, progress, attempts, result and error; on the
// list, its unfinished rows. Every page reads complete without this script.
(function () {
  "use strict";
  if (!window.EventSource || !window.fetch || !window.DOMParser) { return; }
  var FINISHED = ["completed", "failed", "cancelled"];
  var fetching = false;
  var fetchAgain = false;

  // The elements marked data-live are rendered by the server like the rest of
  // the page: read the page's own URL again and swap in their new versions,
  // one read at a time however fast the events come.
  function refresh() {
    if (fetching) { fetchAgain = true; return; }
    fetching = true;
    fetch(window.location.href, { credentials: "same-origin" })
      .then(function (response) { return response.ok ? response.text() : null; })
      .then(function (html) {
        if (html === null) { return; }
        var fresh = new DOMParser().parseFromString(html, "text/html");
        document.querySelectorAll("[data-live]").forEach(function (old) {
          var found = old.id ? fresh.getElementById(old.id) : null;
          if (found) { old.replaceWith(document.importNode(found, true)); }
        });
      })
      .catch(function () { /* the next event tries again */ })
      .then(function () {
        fetching = false;
        if (fetchAgain) { fetchAgain = false; refresh(); }
      });
  }

  function progressText(task) { return task.progress === null ? "" : String(task.progress); }

  function followTask(summary) {
    var seen = { status: summary.dataset.status, attempts: summary.dataset.attempts };
    var source = new EventSource(summary.dataset.events);
    source.addEventListener("task", function (event) {
      var task = JSON.parse(event.data);
      var status = document.getElementById("task-status");
      status.textContent = task.status;
      status.className = "status-" + task.status;
      document.getElementById("task-progress").value = task.progress || 0;
      document.getElementById("task-progress-text").textContent = progressText(task) || "—";
      document.getElementById("task-progress-message").textContent = task.progress_message || "";
      if (task.status !== seen.status || String(task.attempts) !== seen.attempts) {
        seen = { status: task.status, attempts: String(task.attempts) };
        refresh();
      }
      if (FINISHED.indexOf(task.status) >= 0) { source.close(); }
    });
  }

  function followList(list) {
    var open = {};
    var left = 0;
    list.querySelectorAll("tr[data-task-id]").forEach(function (row) {
      if (FINISHED.indexOf(row.querySelector("td.status").textContent) < 0) {
        open[row.dataset.taskId] = true;
        left += 1;
      }
    });
    var source = new EventSource(list.dataset.events);
    source.addEventListener("task", function (event) {
      var task = JSON.parse(event.data);
      var row = document.getElementById("task-" + task.task_id);
      if (!row) { return; }
      var status = row.querySelector("td.status");
      var changed = status.textContent !== task.status;
      status.textContent = task.status;
      row.className = "status-" + task.status;
      row.querySelector("td.progress").textContent = progressText(task);
      if (changed) { refresh(); }
      if (FINISHED.indexOf(task.status) >= 0 && open[task.task_id]) {
        delete open[task.task_id];
        left -= 1;
        if (left === 0) { source.close(); }
      }
    });
  }

  var summary = document.getElementById("summary");
  if (summary && summary.dataset.events) { followTask(summary); }
  var list = document.getElementById("task-list");
  if (list && list.dataset.events) { followList(list); }
})();
