"use strict";
// Starts Swagger UI on the service's OpenAPI schema (the page GET /docs, featmap_ray/serve/page.py). A file
// rather than an inline script: the page's Content-Security-Policy allows scripts from the app only. The
// schema's URL is relative (data-openapi), so the docs also work under a Serve route prefix.

const root = document.getElementById("swagger-ui");
window.ui = SwaggerUIBundle({
  url: root.dataset.openapi,
  domNode: root,
  layout: "BaseLayout",
  presets: [SwaggerUIBundle.presets.apis],
  deepLinking: true,
  showExtensions: true,
  showCommonExtensions: true,
  // No badge from the public validator (validator.swagger.io): nothing may leave the machine.
  validatorUrl: null,
});
